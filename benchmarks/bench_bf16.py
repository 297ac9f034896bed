"""bf16 against float32 on this CPU (issue 22), every number a ratio from one session of fresh,
interleaved processes (the order reversed every other repeat), the machine and its load named.

``--part head``: the fused LM head at SmolLM2-135M's shape (N tokens x H=576 x V=49152, the
    frozen head of LoRA training: gradients to the hidden states only), one thread:
      rlfuse bf16     K.linear_logprobs, bf16 hidden and weight (cpp backend)
      torch bf16      chunked torch: per token chunk (h @ W.T) in bf16, .float(), log-sum-exp,
                      gather; the backward recomputes the chunk's logits (the usual recipe)
      rlfuse fp32     K.linear_logprobs, float32
    with each one's share of this core's measured peak (``flop_peak``: the bf16 dot-product loop
    for the bf16 rows, the fp32 FMA loop for fp32), and F.linear alone at the sampler's decode
    shapes in both dtypes (where bf16 is slower, it shows here).
``--part step``: one GRPO step end to end on SmolLM2-135M (``bench_e2e``'s rlfuse and TRL
    children, P x G x L, gradient checkpointing on in both): rlfuse bf16 vs rlfuse fp32, and
    TRL GRPOTrainer vs rlfuse both in bf16 (and both in fp32).
Writes ``bf16-<part>.json`` / ``.md`` under ``--out``. Run:
``python -m rlfuse.benchmarks.bench_bf16 --part head|step [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

H, V = 576, 49152  # SmolLM2-135M's hidden size and vocabulary
DECODE_SHAPES = [(32, 576, 1536), (32, 1536, 576), (32, 576, 576), (32, 576, 49152)]  # M x K x N


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch_chunked(h, w, y, chunk: int):
    """Chunked torch log-probs of a frozen head, gradient to ``h`` (recompute in backward)."""
    import torch

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            out, lses = [], []
            for s in range(0, h.shape[0], chunk):
                z = (h[s:s + chunk] @ w.t()).float()
                lse = torch.logsumexp(z, -1)
                out.append(z.gather(-1, y[s:s + chunk, None]).squeeze(-1) - lse)
                lses.append(lse)
            ctx.save_for_backward(h, torch.cat(lses))
            return torch.cat(out)

        @staticmethod
        def backward(ctx, g):
            h, lse = ctx.saved_tensors
            gh = torch.empty_like(h)
            for s in range(0, h.shape[0], chunk):
                e = s + chunk
                gz = torch.exp((h[s:e] @ w.t()).float() - lse[s:e, None]) * -g[s:e, None]
                gz.scatter_add_(-1, y[s:e, None], g[s:e, None])
                gh[s:e] = gz.to(h.dtype) @ w
            return gh

    return Chunked.apply(h)


def head_child(impl: str, n: int, reps: int) -> dict:
    import torch

    import rlfuse.kernels as K

    torch.set_num_threads(1)
    dtype = torch.float32 if impl == "rlfuse_fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, H, generator=g)).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    chunk = max(16, (1 << 22) // V // 16 * 16)  # the op's CPU default (~4M logits per chunk), for both

    def call(h):
        if impl == "torch_bf16":
            return _torch_chunked(h, weight, labels, chunk)
        with K.use_backend("cpp"):
            return K.linear_logprobs(h, weight, labels, chunk_size=chunk)

    def fwd():
        with torch.no_grad():
            call(hidden)

    def fwd_bwd():
        h = hidden.clone().requires_grad_(True)
        call(h).sum().backward()

    out = {"fwd_s": _time(fwd, reps), "fwd_bwd_s": _time(fwd_bwd, reps)}
    if impl != "torch_bf16":
        for m, k, nn in DECODE_SHAPES:  # F.linear alone at the decode shapes, this dtype
            x, wt = torch.randn(m, k, generator=g).to(dtype), torch.randn(nn, k, generator=g).to(dtype)
            out[f"linear_{m}x{k}x{nn}_s"] = _time(lambda: torch.nn.functional.linear(x, wt), max(reps, 20))
    return out


def step_child(engine: str, dtype: str, model_dir: str, P: int, G: int, L: int, steps: int) -> dict:
    from types import SimpleNamespace

    import torch

    torch.set_num_threads(1)
    from rlfuse.benchmarks import bench_e2e as E

    a = SimpleNamespace(model="smollm2", model_dir=model_dir, P=P, G=G, L=L, steps=steps, grad_ckpt=True,
                        rlfuse_grad_ckpt=True, micro_batch=None, dtype=dtype, threads=1)
    return (E.run_trl if engine == "trl" else E.run_rlfuse)(a)


def _spawn(call: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", f"import json; from rlfuse.benchmarks.bench_bf16 import *; "
                           f"print('RESULT' + json.dumps({call}))"], capture_output=True, text=True, env=env,
                          timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {call} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def _interleaved(jobs: dict[str, str], repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {k: [] for k in jobs}
    keys = list(jobs)
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            runs[k].append(_spawn(jobs[k]))
            print(f"[bench_bf16] repeat {r + 1}/{repeats} {k}: {runs[k][-1]}", file=sys.stderr)
    return runs


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}


def run_head(a) -> tuple[dict, str]:
    from .flop_peak import peaks

    peak = peaks()
    impls = ("rlfuse_bf16", "torch_bf16", "rlfuse_fp32")
    runs = _interleaved({i: f"head_child({i!r}, {a.n}, {a.reps})" for i in impls}, a.repeats)
    med = {i: _median(runs[i]) for i in impls}
    flops = {"fwd_s": 2.0 * a.n * H * V, "fwd_bwd_s": 6.0 * a.n * H * V}  # fwd: 1 matmul; +bwd: recompute + dH
    rows = []
    for i in impls:
        p = peak["fma_f32"] if i.endswith("fp32") else peak.get("dot_bf16", peak["fma_f32"])
        for mode, f in flops.items():
            med[i][mode.replace("_s", "_peak_fraction")] = f / med[i][mode] / p
        rows.append(f"| {i} | {med[i]['fwd_s'] * 1e3:.0f} ms ({100 * med[i]['fwd_peak_fraction']:.0f}% of peak) | "
                    f"{med[i]['fwd_bwd_s'] * 1e3:.0f} ms ({100 * med[i]['fwd_bwd_peak_fraction']:.0f}% of peak) |")
    r, t, f32 = med["rlfuse_bf16"], med["torch_bf16"], med["rlfuse_fp32"]
    lin = [f"| {k[len('linear_'):-2]} | {f32[k] * 1e3:.2f} | {r[k] * 1e3:.2f} | {f32[k] / r[k]:.2f}x |"
           for k in r if k.startswith("linear_")]
    md = (f"Fused LM head, N={a.n} x H={H} x V={V} (SmolLM2-135M), frozen head, one thread; best of {a.reps} calls "
          f"per process, median of {a.repeats} fresh interleaved processes. One core's measured peaks: fp32 FMA "
          f"{peak['fma_f32'] / 1e9:.1f} GFLOP/s, bf16 dot (vdpbf16ps) {peak.get('dot_bf16', float('nan')) / 1e9:.1f} "
          f"GFLOP/s. FLOPs counted: 2NHV forward, 6NHV forward+backward (logits, recomputed logits, dH).\n\n"
          "| impl | forward | forward + backward |\n|---|---|---|\n" + "\n".join(rows) +
          f"\n\nrlfuse bf16 vs torch bf16 chunked: forward {t['fwd_s'] / r['fwd_s']:.2f}x, forward+backward "
          f"{t['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}x; rlfuse bf16 vs rlfuse fp32: forward {f32['fwd_s'] / r['fwd_s']:.2f}x, "
          f"forward+backward {f32['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}x.\n\n"
          "F.linear alone (best call, ms) at the sampler's decode shapes:\n\n| M x K x N | fp32 | bf16 | fp32/bf16 |\n"
          "|---|---|---|---|\n" + "\n".join(lin) + "\n")
    return {"peaks": peak, "median": med, "runs": runs, "N": a.n}, md


def run_step(a) -> tuple[dict, str]:
    from .baselines import smollm2_dir

    model_dir = smollm2_dir()
    combos = [("rlfuse", "float32"), ("rlfuse", "bfloat16"), ("trl", "bfloat16"), ("trl", "float32")]
    jobs = {f"{e}-{d}": f"step_child({e!r}, {d!r}, {model_dir!r}, {a.P}, {a.G}, {a.L}, {a.steps})" for e, d in combos}
    runs = _interleaved(jobs, a.repeats)
    med = {k: _median(v) for k, v in runs.items()}
    rows = [f"| {k} | {m['step_s']:.2f} ({m['rollout_s']:.2f} + {m['update_s']:.2f}) | {m['step_cpu_s']:.2f} | "
            f"{m['peak_growth_mb']:.0f} | {runs[k][0].get('lora_dtype')} |" for k, m in med.items()]
    rb, rf, tb, tf = (med[k] for k in ("rlfuse-bfloat16", "rlfuse-float32", "trl-bfloat16", "trl-float32"))
    md = (f"One GRPO step, SmolLM2-135M, P={a.P} G={a.G} L={a.L}, gradient checkpointing on in both engines, one "
          f"thread; median over steps (first excluded) of {a.steps}, median of {a.repeats} fresh interleaved "
          "processes per row.\n\n| engine-dtype | step s (rollout + update) | CPU s per step | peak RSS growth MiB | "
          "LoRA dtype |\n|---|---|---|---|---|\n" + "\n".join(rows) +
          f"\n\nWall time (CPU time) ratios: rlfuse fp32/bf16 step **{rf['step_s'] / rb['step_s']:.2f}x** "
          f"({rf['step_cpu_s'] / rb['step_cpu_s']:.2f}x; rollout {rf['rollout_s'] / rb['rollout_s']:.2f}x, update "
          f"{rf['update_s'] / rb['update_s']:.2f}x); TRL/rlfuse both bf16 **{tb['step_s'] / rb['step_s']:.2f}x** "
          f"({tb['step_cpu_s'] / rb['step_cpu_s']:.2f}x) at {rb['peak_growth_mb'] / max(1e-9, tb['peak_growth_mb']):.2f}x "
          f"TRL's memory growth; TRL/rlfuse both fp32 {tf['step_s'] / rf['step_s']:.2f}x "
          f"({tf['step_cpu_s'] / rf['step_cpu_s']:.2f}x); TRL fp32/bf16 {tf['step_s'] / tb['step_s']:.2f}x "
          f"({tf['step_cpu_s'] / tb['step_cpu_s']:.2f}x).\n")
    return {"median": med, "runs": runs, "P": a.P, "G": a.G, "L": a.L, "steps": a.steps}, md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("head", "step"), required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=256, help="head: tokens")
    ap.add_argument("--reps", type=int, default=3, help="head: timed calls per process (best kept)")
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu-intel-xeon-2c"))
    a = ap.parse_args(argv)
    from .machine import cpu_model

    load0 = os.getloadavg()
    res, md = (run_head if a.part == "head" else run_step)(a)
    load1 = os.getloadavg()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res.update(cpu=cpu_model(), load_before=load0, load_after=load1, measured_at=stamp)
    md = (f"# bf16 vs float32, {a.part} ({cpu_model()}, 2 cores shared with other jobs; load average "
          f"{load0[0]:.1f}/{load0[1]:.1f} before, {load1[0]:.1f}/{load1[1]:.1f} after; {stamp})\n\n" + md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bf16-{a.part}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"bf16-{a.part}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
