#!/usr/bin/env bash
# Build .gpu_carry/ (git-ignored) from this machine's installed packages, for gpu_check.sh on a
# borrowed GPU machine that has no network and lacks these packages:
#   bitsandbytes/  its Python files + libbitsandbytes_cuda130.so (the device's torch is cu130)
#   liger_kernel/  pure Python + Triton (the fused linear cross-entropy peer)
#   trl/           pure Python (trl.kernels' chunked LM head peer; imports without datasets)
# Stays well under 20 MB. Run here, then name .gpu_carry in the device call's `carry`:
#   bash benchmarks/prepare_gpu_carry.sh && du -sh .gpu_carry
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_carry
CUDA_TAG=${BNB_CUDA_TAG:-130}
LIMIT_MB=${GPU_CARRY_LIMIT_MB:-20}
rm -rf "$DEST"
mkdir -p "$DEST"

site_of() {  # the folder of an installed package, or fail loudly
  python - "$1" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"prepare_gpu_carry: package {sys.argv[1]!r} is not installed here")
print(list(spec.submodule_search_locations)[0])
EOF
}

copy_python() {  # copy_python PACKAGE: every non-compiled file, without caches and shared objects
  local src
  src=$(site_of "$1")
  (cd "$(dirname "$src")" && find "$1" -type f ! -name '*.pyc' ! -name '*.so' ! -path '*/__pycache__/*' \
     -print0 | tar --null -cf - -T -) | tar -xf - -C "$DEST"
}

copy_python bitsandbytes
copy_python liger_kernel
copy_python trl
so="$(site_of bitsandbytes)/libbitsandbytes_cuda${CUDA_TAG}.so"
if [ ! -f "$so" ]; then
  # the manylinux wheel of the same version ships it; pip needs the network for this
  echo "prepare_gpu_carry: $so missing; fetching the bitsandbytes wheel" >&2
  ver=$(python -c "import importlib.metadata as m; print(m.version('bitsandbytes'))")
  tmp=$(mktemp -d)
  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes==$ver"
  unzip -q -o -j "$tmp"/bitsandbytes-*.whl "bitsandbytes/libbitsandbytes_cuda${CUDA_TAG}.so" -d "$DEST/bitsandbytes"
  rm -rf "$tmp"
else
  cp "$so" "$DEST/bitsandbytes/"
fi
# trl's chat templates, configs and scripts are not needed to import trl.kernels
rm -rf "$DEST/trl/templates" "$DEST/trl/chat_templates" "$DEST/trl/accelerate_configs" "$DEST/trl/scripts"
python - "$DEST" <<'EOF' >"$DEST/VERSIONS.txt"
import importlib.metadata as m, sys
for name in ("bitsandbytes", "liger-kernel", "trl"):
    print(name, m.version(name))
EOF
size_kb=$(du -sk "$DEST" | cut -f1)
echo "prepare_gpu_carry: $DEST = $((size_kb / 1024)) MB ($(tr '\n' ' ' <"$DEST/VERSIONS.txt"))"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "prepare_gpu_carry: $DEST is over ${LIMIT_MB} MB" >&2
  exit 1
fi
