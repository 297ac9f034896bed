#!/usr/bin/env bash
# One-shot check on a borrowed GPU machine (H100/H200, torch 2.11 cu130, no network): build the
# CUDA extension (FAILS LOUDLY when it does not build), run the CUDA and Triton tests, the kernel
# benchmarks with roofline fractions and targets, linear_logprobs against Liger-Kernel and TRL,
# and one PPO iteration on the 4-bit backbone (Llama-3.2-1B and Llama-3.1-8B shapes). Everything
# lands under $OUT; $OUT/summary.md is always written.
#
# Budget: GPU_CHECK_BUDGET_S (default 540 s = 9 min, so a rerun fits in 15 min of device time).
# Every step has its own limit, cut to what is left of the budget; a step that would start with
# under 20 s left is skipped and named in the summary. Steps run most-important first.
#
#   bash benchmarks/prepare_gpu_carry.sh         # here, once: .gpu_carry/ (bitsandbytes, liger, trl)
#   OUT=/tmp/out bash benchmarks/gpu_check.sh    # there, with .gpu_carry carried
#   GPU_CHECK_DRY_RUN=1 OUT=/tmp/out bash benchmarks/gpu_check.sh   # here: CPU dry run, tiny sizes
#
# Without a CUDA device (or with GPU_CHECK_DRY_RUN=1) it is a dry run: the CUDA-only steps are
# skipped with the reason, the others run at tiny sizes on the CPU, and this checkout's build is
# left alone. Exit code: 0 when every step ran and passed, 1 when a step failed or _C_cuda did
# not build.
#
# The benchmarks are `rlfuse bench` scenarios: this script only names them and their sizes.
# Files ($OUT; the device tool returns at most 8): summary.md, bench_results.md + .json (the
# scenarios' reports: the kernel ops and gpu_engine), logs.tar.gz (env.txt, build.log,
# build_errors.txt, import.txt, tests_*.log, bench.log, engine_*.log).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/rlfuse_gpu_check}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
SUMMARY="$OUT/summary.md"
LOG="$OUT/logs"  # tarred into logs.tar.gz at the end: the device tool returns at most 8 files
mkdir -p "$LOG"
FAILED=()
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the device image's python3 holds torch

if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] || ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  DRY=1
else
  DRY=0
fi
{
  echo "# rlfuse gpu_check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  [ "$DRY" = 1 ] && echo "**DRY RUN** (no CUDA device or GPU_CHECK_DRY_RUN=1): CUDA steps skipped, the rest at tiny sizes on CPU." && echo
  echo "## steps"
  echo
} >"$SUMMARY"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
skip() { echo "- $1: SKIPPED ($2)" >>"$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD with a timeout of min(LIMIT_S, what is left), record the result
step() {
  local name=$1 limit=$2
  shift 2
  local rem
  rem=$(left)
  if [ "$rem" -lt 20 ]; then
    skip "$name" "only ${rem}s of the ${BUDGET_S}s budget left"
    return 124
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(($(date +%s) - t0))
  local verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMED OUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (rc=$rc)"
  fi
  [ "$rc" -ne 0 ] && FAILED+=("$name")
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
# the packages the device lacks, carried in the working tree (benchmarks/prepare_gpu_carry.sh)
if [ -d .gpu_carry ]; then
  export PYTHONPATH="$PWD/.gpu_carry${PYTHONPATH:+:$PYTHONPATH}"
  echo "- carried packages on PYTHONPATH: $(tr '\n' ' ' <.gpu_carry/VERSIONS.txt 2>/dev/null)" >>"$SUMMARY"
else
  echo "- **no .gpu_carry/**: bitsandbytes, liger_kernel and trl come only from the image (run benchmarks/prepare_gpu_carry.sh and carry .gpu_carry)" >>"$SUMMARY"
fi
{
  echo "## nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "## nvcc"
  nvcc --version 2>&1 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  echo "## python"
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for mod in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "trl"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(mod, "missing:", type(exc).__name__, exc)
EOF
  echo "## build tools"
  echo "cpus $(nproc)"
  ninja --version 2>&1 | sed 's/^/ninja /' || echo "ninja missing: the extensions build one file at a time"
} >"$LOG/env.txt" 2>&1
echo "- environment: see env.txt in logs.tar.gz ($(grep -m1 '^device' "$LOG/env.txt" || echo 'no CUDA device'))" >>"$SUMMARY"

# ---- 2. build _C_cuda against the device's torch --------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip "build _C_cuda" "dry run: no CUDA device; this checkout's build is left as it is"
else
  # extensions built on another machine (another torch) must not be picked up as up to date
  rm -f kernels/_C*.so
  rm -rf build
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" RLFUSE_BUILD_CUDA=1
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
  step "build (pip install -e ., sm_90)" 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    >"$LOG/build.log" 2>&1
  grep -iE "error|failed|warning: rlfuse" "$LOG/build.log" | tail -n 40 >"$LOG/build_errors.txt"
fi
"$PY" - >"$LOG/import.txt" 2>&1 <<'EOF'
import rlfuse.kernels as K
print("available backends:", K.available_backends())
print("unavailable:", K.unavailable_reasons())
try:
    import rlfuse.kernels._C_cuda as C
    print("_C_cuda:", C.__file__)
except Exception as exc:
    print("_C_cuda import FAILED:", type(exc).__name__, exc)
EOF
echo "- backends: $(grep -m1 'available backends' "$LOG/import.txt" || echo 'rlfuse did not import: see import.txt')" >>"$SUMMARY"
CUDA_OK=1
if [ "$DRY" = 0 ] && ! grep -q "^_C_cuda: " "$LOG/import.txt"; then
  CUDA_OK=0
  FAILED+=("_C_cuda build")
  echo "- **FAILED: _C_cuda did not build or import** - $(grep -m1 '_C_cuda import FAILED' "$LOG/import.txt"); see build_errors.txt" >>"$SUMMARY"
  echo "gpu_check: FAILED: _C_cuda did not build (see build_errors.txt in $OUT/logs.tar.gz)" >&2
fi

# ---- 3. CUDA tests ---------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip "tests: CUDA backend" "dry run: no CUDA device"
elif [ "$CUDA_OK" = 0 ]; then
  skip "tests: CUDA backend" "_C_cuda did not build"
else
  step "tests: CUDA backend" 90 "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -m "not slow" \
    tests/test_cuda_backend.py tests/test_cuda_sources.py -k "not emu" >"$LOG/tests_cuda.log" 2>&1
  echo "  - $(tail -n 1 "$LOG/tests_cuda.log")" >>"$SUMMARY"
fi

# ---- 4. kernel benchmarks with roofline fractions and the GPU targets ------------------------------
# the targets' sizes: logprobs bf16 N=16384 V=128256, linear_logprobs bf16 N=16384 H=4096 V=128256
# (vs Liger FLCE and TRL's chunked head), gae [512, 2048], ppo_loss 1M tokens (vs eager, torch.compile)
BENCH=("$PY" -m rlfuse.benchmarks.runner --no-progress --no-plots --out "$LOG/bench")
if [ "$DRY" = 1 ]; then
  step "benchmarks: kernels + roofline (dry run: CPU, tiny sizes)" 240 "${BENCH[@]}" --device cpu --no-isolate \
    --scenarios logprobs linear_logprobs gae ppo_loss \
    --sizes logprobs:N=256,V=1024 linear_logprobs:N=256,H=32,V=1024 gae:B=8,T=64 ppo_loss:N=4096 \
    --impls rlfuse log_softmax_gather matmul_log_softmax_gather python_loop eager >"$LOG/bench.log" 2>&1
else
  step "benchmarks: kernels + roofline (GPU sizes)" 170 "${BENCH[@]}" --device cuda --no-isolate --timeout 60 \
    --scenarios logprobs linear_logprobs gae ppo_loss --compare-backends triton \
    --sizes logprobs:N=16384,V=128256,dtype=bfloat16 linear_logprobs:N=16384,H=4096,V=128256,dtype=bfloat16 \
    gae:B=512,T=2048 ppo_loss:N=1M >"$LOG/bench.log" 2>&1
fi

# ---- 5. one PPO iteration on the shared (4-bit) backbone vs four separate bf16 models ---------------
engine() {  # engine NAME LIMIT SIZE LAYOUT: the gpu_engine scenario at SIZE (K=V,...), one layout
  step "engine: $1" "$2" "${BENCH[@]}" --scenarios gpu_engine --sizes "gpu_engine:$3" --engines "$4" \
    --repeats 1 >"$LOG/engine_$1.log" 2>&1
}
TINY=model=tiny,batch=2,prompt_len=16,new_tokens=8
if [ "$DRY" = 1 ]; then
  engine tiny-shared 120 "$TINY" shared
  engine tiny-separate 120 "$TINY" separate
else
  engine llama-8b-shared-nf4 130 model=llama-8b shared
  engine llama-1b-shared-nf4 80 model=llama-1b shared
fi

# ---- 6. the Triton backend and the other GPU tests --------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip "tests: Triton + other GPU tests" "dry run: no CUDA device (on CPU they run under TRITON_INTERPRET in the normal suite)"
else
  step "tests: Triton + other GPU tests" 60 "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -m "not slow" \
    tests --ignore=tests/test_cuda_backend.py --ignore=tests/test_cuda_sources.py \
    -k "(cuda or triton or gpu) and not emu" >"$LOG/tests_triton.log" 2>&1
  echo "  - $(tail -n 1 "$LOG/tests_triton.log")" >>"$SUMMARY"
fi

# ---- 7. the four-separate-models baseline where time is left (the 8B one is not expected to fit) ----
if [ "$DRY" = 0 ]; then
  engine llama-1b-separate-bf16 70 model=llama-1b separate
  engine llama-8b-separate-bf16 60 model=llama-8b separate
fi

# ---- 8. summary --------------------------------------------------------------------------------
{
  echo
  echo "total: $(($(date +%s) - START))s of a ${BUDGET_S}s budget"
  echo
  if [ ${#FAILED[@]} -eq 0 ]; then
    echo "## RESULT: every step that ran passed"
  else
    echo "## RESULT: FAILED - ${FAILED[*]}"
  fi
  kernel_md=$(find "$LOG/bench" -path '*/custom/results.md' 2>/dev/null | sort)
  if [ -n "$kernel_md" ]; then
    echo
    echo "## kernel targets and roofline (each scenario's results.md)"
    for f in $kernel_md; do
      echo
      sed -n '/^## Foundation targets/,/^## rlfuse vs each baseline/p' "$f" | sed '$d'
    done
  else
    echo
    echo "## kernel benchmarks: no results.md (see bench.log)"
    tail -n 5 "$LOG/bench.log" 2>/dev/null
  fi
  engine_md=$(find "$LOG/bench" -path '*/gpu_engine/results.md' 2>/dev/null | head -n 1)
  if [ -n "$engine_md" ]; then
    echo
    echo "## PPO iteration (512 prompt + 256 new tokens on the GPU; peak = whole step, models included)"
    echo
    grep '^|' "$engine_md"
  fi
  echo
  echo "## failing tests"
  grep -hE "^(FAILED|ERROR)" "$LOG/tests_cuda.log" "$LOG/tests_triton.log" 2>/dev/null | head -n 40 || true
  if [ -s "$LOG/build_errors.txt" ]; then
    echo
    echo "## build errors (tail)"
    tail -n 15 "$LOG/build_errors.txt"
  fi
} >>"$SUMMARY" 2>&1
if [ -n "$kernel_md" ] || [ -n "$engine_md" ]; then  # every scenario's report, one file each kind
  cat $kernel_md $engine_md >"$OUT/bench_results.md"
  "$PY" -c 'import json, sys; print(json.dumps({p: json.load(open(p)) for p in sys.argv[1:]}))' \
    $(find "$LOG/bench" -name '*.json' | sort) >"$OUT/bench_results.json" 2>/dev/null
fi
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOG"
cat "$SUMMARY"
[ ${#FAILED[@]} -eq 0 ]
