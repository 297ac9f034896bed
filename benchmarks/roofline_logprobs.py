"""How close logprobs_from_logits (forward, and forward+backward) runs to this machine's
memory-bandwidth floor.

floor = bytes the op must move / bandwidth of a large copy, both measured in this run:
  * forward reads the logits once                      -> N·V·elem bytes
  * backward reads the logits again and writes a fresh gradient -> 2·N·V·elem bytes
  * bandwidth = 2·256 MB / time of ``dst.copy_(src)`` into an already-touched ``dst`` (read +
    write, no page faults); the time of ``src.clone()`` (a fresh destination, page faults and
    kernel zero-fill included) is printed beside it, and the minor page faults of each call.
RLFUSE_RECYCLE_GRADIENTS=0 shows the backward with a fresh gradient every step (kernels/logprobs.py).
Every timing is the median of interleaved repeats, so load from other processes hits all of
them alike. Run: ``python -m benchmarks.roofline_logprobs [--n 4096 --vocab 32000 --repeats 7]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import rlfuse.kernels as K


def _time(fn) -> tuple[float, int]:
    """(seconds, minor page faults) of one call."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="cpp")
    args = ap.parse_args(argv)

    n, v = args.n, args.vocab
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen).mul_(3).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen)
    copy_src = torch.randn(64 << 20, generator=gen)  # 256 MB of float32
    copy_dst = torch.empty_like(copy_src).copy_(copy_src)  # touched: no page faults when timed

    def forward():
        with torch.no_grad():
            K.logprobs_from_logits(logits, labels)

    def forward_backward():
        logits.grad = None
        K.logprobs_from_logits(logits, labels).sum().backward()

    cases = {
        "copy_": lambda: copy_dst.copy_(copy_src),
        "clone": lambda: copy_src.clone(),
        "forward": forward,
        "forward+backward": forward_backward,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    faults: dict[str, list[int]] = {k: [] for k in cases}
    with K.use_backend(args.backend):
        for fn in cases.values():  # warm-up (first-call imports, dispatch caches)
            fn()
        for _ in range(args.repeats):
            for name, fn in cases.items():
                logits.grad = None  # free the last gradient so each run allocates a fresh one
                seconds, n_faults = _time(fn)
                times[name].append(seconds)
                faults[name].append(n_faults)
    med = {k: statistics.median(t) for k, t in times.items()}

    copy_bytes = 2 * copy_src.numel() * copy_src.element_size()
    bandwidth = copy_bytes / med["copy_"]
    logit_bytes = n * v * logits.element_size()
    floor = {"forward": logit_bytes / bandwidth, "forward+backward": 3 * logit_bytes / bandwidth}
    result = {"n": n, "vocab": v, "backend": args.backend, "threads": torch.get_num_threads(),
              "bandwidth_GBps": bandwidth / 1e9, "clone_GBps": copy_bytes / med["clone"] / 1e9,
              "load": os.getloadavg()[0]}
    print(f"logprobs roofline  N={n} V={v} fp32  backend={args.backend}  threads={result['threads']}  "
          f"load(1 min)={result['load']:.2f}")
    print(f"copy bandwidth {result['bandwidth_GBps']:.1f} GB/s (copy_ into touched memory); "
          f"clone into fresh memory {result['clone_GBps']:.1f} GB/s")
    for name in ("forward", "forward+backward"):
        frac = floor[name] / med[name]
        pf = statistics.median(faults[name])
        result[name] = {"ms": med[name] * 1e3, "floor_ms": floor[name] * 1e3, "fraction_of_floor": frac,
                        "page_faults": pf}
        print(f"{name:>17}: {med[name] * 1e3:8.1f} ms   floor {floor[name] * 1e3:6.1f} ms   "
              f"{frac:5.0%} of the floor ({med[name] / floor[name]:.2f}x the floor)   {pf:,.0f} page faults")
    return result


if __name__ == "__main__":
    main()
