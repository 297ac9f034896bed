#!/usr/bin/env bash
# One-shot check on a borrowed GPU machine (H100/H200, no network): build the extensions, run the
# GPU tests, run the GPU benchmarks, and leave everything under $OUT. Finishes inside 7.5 min: a
# 420 s budget (GPU_CHECK_BUDGET_S) plus start-up; every step has a timeout, cut to what is left
# of the budget, and a failed step does not stop the next ones. $OUT/summary.md always says what
# happened.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Files: env.txt, build.log (+ build_errors.txt), import.txt, tests_cuda.log, tests_gpu.log,
# gpu_results.md (the CUDA kernels vs eager PyTorch, + bench_cuda_kernels.{py,log}),
# bench/ and bench.log (rlfuse.benchmarks.runner), summary.md.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/rlfuse_gpu_check}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
SUMMARY="$OUT/summary.md"
echo "# rlfuse gpu_check ($(date -u +%Y-%m-%dT%H:%M:%SZ))" >"$SUMMARY"
echo >>"$SUMMARY"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME LIMIT_S CMD...: run CMD with a timeout of min(LIMIT_S, what is left), record the result
step() {
  local name=$1 limit=$2
  shift 2
  local rem
  rem=$(left)
  if [ "$rem" -lt 20 ]; then
    echo "- $name: SKIPPED (only ${rem}s of the budget left)" >>"$SUMMARY"
    return 124
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(($(date +%s) - t0))
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict="FAILED (rc=$rc)"
  [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  echo "- $name: $verdict in ${dt}s" >>"$SUMMARY"
  return "$rc"
}

# ---- 1. environment ---------------------------------------------------------------------------
# setup.py builds the CUDA extension only when it finds nvcc (PATH or CUDA_HOME)
if ! command -v nvcc >/dev/null 2>&1; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then
      export CUDA_HOME="$d" PATH="$d/bin:$PATH"
      break
    fi
  done
fi
{
  echo "## nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "## nvcc"
  nvcc --version 2>&1 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  echo "## python"
  python - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for mod in ("triton", "transformers", "peft", "bitsandbytes"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", type(exc).__name__)
EOF
  echo "## build tools"
  echo "cpus $(nproc)"
  ninja --version 2>&1 | sed 's/^/ninja /' || echo "ninja missing: the extensions build one file at a time"
} >"$OUT/env.txt" 2>&1
echo "- environment: see env.txt ($(grep -m1 '^device' "$OUT/env.txt" || echo 'no CUDA device'))" >>"$SUMMARY"

if [ -d .carry/bnb ]; then
  export PYTHONPATH="$PWD/.carry/bnb${PYTHONPATH:+:$PYTHONPATH}"
  echo "- using the carried bitsandbytes in .carry/bnb" >>"$SUMMARY"
fi

# ---- 2. build ----------------------------------------------------------------------------------
# extensions built on another machine (another torch) must not be picked up as up to date
rm -f kernels/_C*.so
rm -rf build
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
step "build (pip install -e .)" 240 python -m pip install --no-build-isolation --no-deps -v -e . \
  >"$OUT/build.log" 2>&1
grep -iE "error|failed|warning: rlfuse" "$OUT/build.log" | tail -n 40 >"$OUT/build_errors.txt"

python - >"$OUT/import.txt" 2>&1 <<'EOF'
import rlfuse.kernels as K
print("available backends:", K.available_backends())
print("unavailable:", K.unavailable_reasons())
try:
    import rlfuse.kernels._C_cuda as C
    print("_C_cuda:", C.__file__)
except Exception as exc:
    print("_C_cuda import FAILED:", type(exc).__name__, exc)
EOF
backends=$(grep -m1 'available backends' "$OUT/import.txt" || echo 'rlfuse did not import: see import.txt')
echo "- backends: $backends" >>"$SUMMARY"
if grep -q "_C_cuda import FAILED" "$OUT/import.txt"; then
  echo "  - **_C_cuda did not build/import**: see import.txt and build_errors.txt" >>"$SUMMARY"
fi

# ---- 3. tests ----------------------------------------------------------------------------------
# the CUDA backend's own tests first (nvcc compiles + the kernels vs float64 references), then
# the rest of the GPU tests (public ops on the cuda/triton backends). The CPU emulation tests of
# test_cuda_sources.py are for machines without a GPU: skipped here.
step "tests: CUDA backend" 150 python -m pytest -q -p no:cacheprovider --maxfail=20 -m "not slow" \
  tests/test_cuda_backend.py tests/test_cuda_sources.py -k "not emu" >"$OUT/tests_cuda.log" 2>&1
[ -s "$OUT/tests_cuda.log" ] && echo "  - $(tail -n 1 "$OUT/tests_cuda.log")" >>"$SUMMARY"
step "tests: other GPU tests" 120 python -m pytest -q -p no:cacheprovider --maxfail=20 -m "not slow" tests \
  --ignore=tests/test_cuda_backend.py --ignore=tests/test_cuda_sources.py \
  -k "(cuda or triton or gpu) and not emu" >"$OUT/tests_gpu.log" 2>&1
[ -s "$OUT/tests_gpu.log" ] && echo "  - $(tail -n 1 "$OUT/tests_gpu.log")" >>"$SUMMARY"

# ---- 4. benchmarks -----------------------------------------------------------------------------
cat >"$OUT/bench_cuda_kernels.py" <<'EOF'
"""The CUDA backend's kernels vs eager PyTorch on this GPU, one process, CUDA-event timing."""
import statistics
import sys

import torch

from rlfuse.kernels import reference
from rlfuse.kernels.backends import cuda as C

out_path = sys.argv[1]
dev = "cuda"
rows = []


def bench(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def add(op, size, mode, impl, fn, nbytes=None, reps=20):
    try:
        ms = bench(fn, reps=reps)
        mem = peak_mib(fn)
        gbs = f"{nbytes / ms / 1e6:.0f}" if nbytes else ""
        rows.append((op, size, mode, impl, f"{ms:.3f}", gbs, f"{mem:.0f}"))
    except Exception as exc:  # noqa: BLE001 - an OOM or a failure is a row, not the end
        rows.append((op, size, mode, impl, f"error: {type(exc).__name__}: {str(exc)[:80]}", "", ""))
    torch.cuda.empty_cache()
    print(rows[-1], flush=True)


# log-probs, N=16384, V=128256, bf16
N, V = 16384, 128256
x = torch.randn(N, V, device=dev, dtype=torch.bfloat16) * 3
y = torch.randint(0, V, (N,), device=dev)
g = torch.randn(N, device=dev)
size = f"N={N} V={V} bf16"
lp, lse, ent = C.logprobs_forward(x, y, 1.0, True)
add("logprobs", size, "fwd", "rlfuse cuda", lambda: C.logprobs_forward(x, y, 1.0, True), nbytes=x.numel() * 2)
add("logprobs", size, "fwd+bwd", "rlfuse cuda",
    lambda: C.logprobs_backward(x, y, *C.logprobs_forward(x, y, 1.0, True)[1:], g, g, 1.0, False),
    nbytes=x.numel() * 2 * 3)
xi = x.clone()
add("logprobs", size, "bwd in place", "rlfuse cuda",
    lambda: C.logprobs_backward(xi, y, lse, ent, g, None, 1.0, True), nbytes=x.numel() * 2 * 2)
del xi


def eager_fwd(x):
    logprobs = torch.log_softmax(x.float(), -1)
    return logprobs.gather(-1, y[:, None])[:, 0], -(logprobs.exp() * logprobs).sum(-1)


def eager_fwd_bwd():
    xx = x.detach().requires_grad_()
    a, b = eager_fwd(xx)
    torch.autograd.backward([a, b], [g, g])


add("logprobs", size, "fwd", "eager torch", lambda: eager_fwd(x), reps=5)
add("logprobs", size, "fwd+bwd", "eager torch", eager_fwd_bwd, reps=5)
del x

# GAE [512, 2048] with left padding
B, T = 512, 2048
r = torch.randn(B, T, device=dev)
v = torch.randn(B, T, device=dev)
m = torch.arange(T, device=dev)[None, :] >= torch.randint(0, T // 2, (B, 1), device=dev)


def eager_gae(gamma=0.99, lam=0.95):
    # the usual vectorised reverse loop over time, masked positions passed through
    adv = torch.zeros_like(r)
    a = torch.zeros(B, device=dev)
    nv = torch.zeros(B, device=dev)
    mf = m.float()
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * nv - v[:, t]
        a_new = delta + gamma * lam * a
        a = torch.where(m[:, t], a_new, a)
        nv = torch.where(m[:, t], v[:, t], nv)
        adv[:, t] = a * mf[:, t]
    return adv, (adv + v) * mf


add("gae", f"B={B} T={T}", "fwd", "rlfuse cuda", lambda: C.gae(r, v, m, 0.99, 0.95), nbytes=B * T * (4 + 4 + 1 + 8))
add("gae", f"B={B} T={T}", "fwd", "eager torch (loop over T)", eager_gae, reps=3)

# PPO loss, 1M tokens, every term
n = 1 << 20
t = {k: torch.randn(n, device=dev) for k in ("logp", "old", "adv", "ref", "ent", "val", "oldv", "ret")}
t["logp"] = t["logp"] * 0.3 - 1
t["old"] = t["logp"] + 0.1 * t["old"]
mask = (torch.rand(n, device=dev) > 0.2).float()
opts = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
            value_clip=0.2, value_coef=0.5)


def ours_ppo():
    return C.ppo_loss_forward(t["logp"], t["old"], t["adv"], mask, t["ref"], t["ent"], t["val"], t["oldv"],
                              t["ret"], **opts)


def eager_ppo():
    logp = t["logp"].detach().requires_grad_()
    ent = t["ent"].detach().requires_grad_()
    val = t["val"].detach().requires_grad_()
    loss, _ = reference.ppo_loss(logp, t["old"], t["adv"], mask, ref_logp=t["ref"], entropy=ent, values=val,
                                 old_values=t["oldv"], returns=t["ret"], **opts)
    loss.backward()


add("ppo_loss", f"n={n}", "fwd+bwd", "rlfuse cuda", ours_ppo, nbytes=n * 4 * 12)
add("ppo_loss", f"n={n}", "fwd+bwd", "eager torch (reference + autograd)", eager_ppo)

name = torch.cuda.get_device_name()
with open(out_path, "w") as f:
    f.write(f"# rlfuse CUDA kernels vs eager PyTorch on {name}\n\n")
    f.write(f"torch {torch.__version__}, CUDA {torch.version.cuda}; median of CUDA-event timings; "
            "GB/s = the kernel's compulsory bytes / time; peak = extra allocated memory.\n\n")
    f.write("| op | size | mode | impl | ms | GB/s | peak MiB |\n|---|---|---|---|---|---|---|\n")
    for row in rows:
        f.write("| " + " | ".join(row) + " |\n")
    f.write("\n| op | size | mode | speed-up of rlfuse cuda |\n|---|---|---|---|\n")
    for op, size, mode, impl, ms, *_ in rows:
        if impl != "rlfuse cuda":
            continue
        base = [rr for rr in rows if rr[:3] == (op, size, mode) and rr[3] != "rlfuse cuda"]
        try:
            f.write(f"| {op} | {size} | {mode} | {float(base[0][4]) / float(ms):.1f}x vs {base[0][3]} |\n")
        except (IndexError, ValueError):
            pass
print("wrote", out_path)
EOF

# the CUDA kernels' own numbers first (always written), then the project's benchmark runner on
# the ops these kernels serve (it writes its reports only at the end, so it goes last)
step "benchmarks: CUDA kernels vs eager torch" 90 python "$OUT/bench_cuda_kernels.py" "$OUT/gpu_results.md" \
  >"$OUT/bench_cuda_kernels.log" 2>&1
if python -c "import rlfuse.benchmarks.runner" >/dev/null 2>&1; then
  step "benchmarks: rlfuse.benchmarks.runner --gpu" 150 python -m rlfuse.benchmarks.runner --gpu \
    --ops logprobs gae ppo_loss --compare-backends triton --no-isolate --no-progress --no-plots --timeout 40 \
    --out "$OUT/bench" >"$OUT/bench.log" 2>&1
else
  echo "- benchmarks: rlfuse.benchmarks.runner not found (only the CUDA kernel benchmark ran)" >>"$SUMMARY"
fi

# ---- 5. summary --------------------------------------------------------------------------------
{
  echo
  echo "total: $(($(date +%s) - START))s of a ${BUDGET_S}s budget"
  echo
  echo "## failing tests"
  grep -hE "^(FAILED|ERROR)" "$OUT/tests_cuda.log" "$OUT/tests_gpu.log" 2>/dev/null | head -n 40 || true
  echo
  if [ -f "$OUT/gpu_results.md" ]; then
    echo "## CUDA kernels"
    sed -n '3,$p' "$OUT/gpu_results.md"
  fi
  echo
  echo "## build errors (tail)"
  tail -n 15 "$OUT/build_errors.txt" 2>/dev/null
} >>"$SUMMARY"
cat "$SUMMARY"
exit 0
