"""Run under torchrun (2 gloo ranks): checks engine/distributed.py's collectives against
the single-process answer, and writes what each rank saw to $OUT_DIR/rank<r>.json."""
import json
import os
import sys

import torch

from rlfuse.engine import distributed as D

D.init("cpu", timeout_s=60)
w = D.world()
out_dir = sys.argv[1]

# the global batch every rank can rebuild; each rank only uses its shard
g = torch.Generator().manual_seed(0)
x = torch.randn(7, 5, generator=g)
mask = torch.rand(7, 5, generator=g) > 0.3
lo, hi = D.shard_bounds(7)
white = D.masked_whiten(x[lo:hi], mask[lo:hi])

# gradient of a global token mean, from local sums over global counts
p = torch.nn.Parameter(torch.ones(5))
loss = ((x[lo:hi] * p) * mask[lo:hi]).sum() / D.global_count(int(mask[lo:hi].sum()))
loss.backward()
D.reduce_gradients([p])

metrics = D.reduce_metrics({"a": float(w.rank), "name": "x"}, weight=float(hi - lo))
with open(os.path.join(out_dir, f"rank{w.rank}.json"), "w") as fh:
    json.dump({"rank": w.rank, "size": w.size, "lo": lo, "hi": hi, "white": white.tolist(),
               "grad": p.grad.tolist(), "metrics": metrics,
               "objects": D.gather_objects(w.rank * 10)}, fh)
D.barrier()  # no rank tears the group down while another's last collective is in flight
D.shutdown()
