"""The CUDA sources in csrc/cuda, checked without a GPU.

1. Every ``csrc/cuda/*.cu`` compiles with nvcc for the architectures setup.py builds (sm_90 and
   sm_80), warnings as errors; skipped where nvcc is absent.
2. ``bindings.cpp`` parses against torch's headers (slow: the torch headers take a while).
3. The kernels run in the host emulation of csrc/cuda/emu/cuda_emu.h: the .cu files and
   bindings.cpp are compiled with g++ into a CPU extension with the same Python API as
   ``rlfuse.kernels._C_cuda``, plugged into kernels/backends/cuda.py, and put through the checks
   of tests/test_cuda_backend.py on CPU tensors. Blocks run on real threads, so indexing, scans,
   reductions, barriers and shuffles are exercised; speed and fast-math precision are not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from rlfuse.kernels.ppo_options import PPOLossOptions

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None)
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo",
              "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sources_exist():
    names = {p.name for p in CU_FILES}
    assert {"logprobs.cu", "gae.cu", "ppo_loss.cu"} <= names
    assert (CUDA_DIR / "bindings.cpp").is_file() and (CUDA_DIR / "rlfuse_cuda.h").is_file()
    for src in CU_FILES:  # the .cu files stay free of torch so that they build standalone
        text = src.read_text()
        assert "torch/" not in text and "ATen/" not in text, f"{src.name} includes a torch header"


# ---------------------------------------------------------------------------------------------
# 1. nvcc
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(src, tmp_path):
    cmd = [NVCC, *NVCC_FLAGS, "-Werror", "all-warnings", "-c", str(src), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# 2. bindings.cpp against torch's headers
# ---------------------------------------------------------------------------------------------


def _cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if NVCC:
        candidates.append(str(Path(NVCC).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


@pytest.mark.slow
@pytest.mark.skipif(CXX is None or _cuda_include_dir() is None, reason="needs a C++ compiler and the CUDA headers")
def test_bindings_parse(tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = list(include_paths())
    # CPU wheels ship the c10/cuda headers but not their generated cmake macros
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "stub"))
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-I{p}" for p in includes), f"-I{_cuda_include_dir()}", f"-I{sysconfig.get_paths()['include']}",
           str(CUDA_DIR / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-5000:]}"


# ---------------------------------------------------------------------------------------------
# 3. host emulation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emu_backend():
    """kernels/backends/cuda.py bound to the host-emulation build of csrc/cuda."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    # a fixed folder: ninja rebuilds only what changed (it tracks the included headers too)
    build = Path(tempfile.gettempdir()) / f"rlfuse_cuda_emu_{os.getuid()}"
    build.mkdir(parents=True, exist_ok=True)
    sources = []
    for src in [*CU_FILES, CUDA_DIR / "bindings.cpp"]:  # .cu as C++: wrapper files that include them
        wrapper = build / f"emu_{src.stem}.cpp"
        text = f'#include "{src}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    module = cpp_extension.load(
        name="rlfuse_cuda_emu", sources=sources, build_directory=str(build), verbose=False,
        extra_cflags=["-std=c++20", "-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                      "-include", str(CUDA_DIR / "emu" / "cuda_emu.h")],
        extra_ldflags=["-pthread"])
    backend = _load_file("rlfuse_cuda_backend_emu", ROOT / "kernels" / "backends" / "cuda.py")
    backend._C = module
    backend.AVAILABLE = True
    return backend


@pytest.fixture(scope="module")
def checks():
    return _load_file("rlfuse_test_cuda_backend_checks", Path(__file__).with_name("test_cuda_backend.py"))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("vocab", [1, 3, 50, 1000, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_emu_logprobs_forward(emu_backend, checks, vocab, dtype, layout):
    n = 3 if vocab > 10_000 else 6
    checks.check_logprobs_forward(emu_backend, "cpu", n, vocab, dtype, layout, 0.7, True)
    checks.check_logprobs_forward(emu_backend, "cpu", n, vocab, dtype, layout, 1.0, False)


def test_emu_logprobs_large_vocab(emu_backend, checks):
    checks.check_logprobs_forward(emu_backend, "cpu", 2, 128256, torch.bfloat16, "strided", 1.0, True)
    checks.check_logprobs_backward(emu_backend, "cpu", 2, 128256, torch.bfloat16, "strided", 1.0, True, True)
    checks.check_logprobs_forward(emu_backend, "cpu", 0, 50, torch.float32, "contiguous", 1.0, True)
    checks.check_logprobs_extreme(emu_backend, "cpu")


@pytest.mark.parametrize("vocab", [1, 3, 1000, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_entropy,inplace", [(False, False), (True, False), (True, True)])
def test_emu_logprobs_backward(emu_backend, checks, vocab, dtype, layout, with_entropy, inplace):
    n = 3 if vocab > 10_000 else 5
    checks.check_logprobs_backward(emu_backend, "cpu", n, vocab, dtype, layout, 0.8, with_entropy, inplace)


@pytest.mark.parametrize("seq", [1, 7, 300, 2049, 4500])
@pytest.mark.parametrize("pattern", ["full", "left", "holes", "mixed"])
def test_emu_gae(emu_backend, checks, seq, pattern):
    checks.check_gae(emu_backend, "cpu", 5, seq, pattern, 0.99, 0.95)


def test_emu_gae_edge_cases(emu_backend, checks):
    checks.check_gae(emu_backend, "cpu", 5, 100, "mixed", 1.0, 1.0)
    checks.check_gae(emu_backend, "cpu", 5, 100, "mixed", 0.0, 0.95)
    checks.check_gae(emu_backend, "cpu", 5, 100, "mixed", 0.9, 0.0)
    checks.check_gae(emu_backend, "cpu", 3, 100, "full", 0.99, 0.95, pass_mask=False)
    checks.check_gae_padding_invariance(emu_backend, "cpu", 2100)


# a spread of the option grid: every option value appears, in varied combinations
EMU_PPO_CASES = [
    dict(ref=True, ent=True, val=True, old_val=True, kl_estimator="k3", dual_clip=3.0, value_clip=0.2),
    dict(ref=True, ent=False, val=True, old_val=False, kl_estimator="k1", dual_clip=None, value_clip=0.2),
    dict(ref=True, ent=True, val=True, old_val=True, kl_estimator="k2", dual_clip=None, value_clip=None),
    dict(ref=False, ent=True, val=False, old_val=False, kl_estimator="k3", dual_clip=1.5, value_clip=None),
    dict(ref=False, ent=False, val=False, old_val=False, kl_estimator="k1", dual_clip=None, value_clip=0.2),
    dict(ref=True, ent=False, val=True, old_val=True, kl_estimator="k1", dual_clip=2.0, value_clip=0.05),
    dict(ref=True, ent=True, val=True, old_val=True, kl_estimator="k1+", loss_agg="seq-mean-token-mean"),
    dict(ref=True, ent=False, val=True, old_val=False, kl_estimator="k3+", loss_agg="seq-mean-token-sum-norm"),
    dict(ref=True, ent=True, val=False, old_val=False, kl_estimator="k3+", loss_agg="seq-mean-token-sum-norm",
         loss_agg_norm=64.0, dual_clip=2.0),
    dict(ref=True, ent=True, val=True, old_val=True, kl_estimator="k3", kl_clamp=0.05),
    dict(ref=True, ent=False, val=False, old_val=False, kl_estimator="k1+", kl_clamp=0.1),
    dict(ref=False, ent=False, val=False, old_val=False, kl_estimator="k1", log_ratio_clamp=0.1),
    dict(ref=True, ent=True, val=True, old_val=True, kl_estimator="k3", dual_clip=3.0, log_ratio_clamp=0.05,
         kl_clamp=0.05, loss_agg="seq-mean-token-mean"),
]


@pytest.mark.parametrize("case", EMU_PPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_emu_ppo_loss_options(emu_backend, checks, case):
    checks.check_ppo(emu_backend, "cpu", 2500, **case)


@pytest.mark.parametrize("n", [0, 1, 2048, 4097])
@pytest.mark.parametrize("mask_kind", ["random", "none", "all"])
def test_emu_ppo_loss_sizes(emu_backend, checks, n, mask_kind):
    checks.check_ppo(emu_backend, "cpu", n, mask_kind=mask_kind, clip_eps_high=0.2, dual_clip=2.0)
    checks.check_ppo(emu_backend, "cpu", n, mask_kind=mask_kind, kl_estimator="k3+", loss_agg="seq-mean-token-mean")


def test_emu_ppo_loss_masked_garbage(emu_backend, checks):
    checks.check_ppo_masked_garbage(emu_backend, "cpu", 3000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap,logit_scale", [(None, 0.25), (30.0, None), (4.0, -1.5)])
def test_emu_logprobs_softcap_logit_scale_and_neg_inf(emu_backend, checks, dtype, softcap, logit_scale):
    checks.check_logprobs_transform(emu_backend, "cpu", dtype, softcap, logit_scale)


def test_emu_rejects_bad_inputs(emu_backend):
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="labels"):
        emu_backend._C.logprobs_forward(logits, labels.int(), 1.0, False)
    with pytest.raises(RuntimeError, match="temperature"):
        emu_backend._C.logprobs_forward(logits, labels, 0.0, False)
    with pytest.raises(RuntimeError, match="softcap"):
        emu_backend._C.logprobs_forward(logits, labels, 1.0, False, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="logit_scale"):
        emu_backend._C.logprobs_forward(logits, labels, 1.0, False, None, 0.0)
    with pytest.raises(RuntimeError, match="out must"):
        emu_backend._C.logprobs_backward(logits, labels, torch.zeros(4), torch.empty(0), torch.ones(4), None, 1.0, False,
                                         None, 1.0, torch.empty(4, 9))
    _, lse, _ = emu_backend.logprobs_forward(logits, labels, 1.0, False)
    with pytest.raises(ValueError, match="entropy"):
        emu_backend.logprobs_backward(logits, labels, lse, torch.empty(0), torch.ones(4), torch.ones(4), 1.0, False)
    bad_code, needs_weight = PPOLossOptions().pack(), PPOLossOptions().pack()
    bad_code[PPOLossOptions.slot("kl_estimator")] = 9
    needs_weight[PPOLossOptions.slot("loss_agg")] = 1
    with pytest.raises(RuntimeError, match="kl_estimator"):  # codes outside ppo_options.KL_CODES
        emu_backend._C.ppo_loss_forward(*[torch.zeros(3)] * 4, None, None, None, None, None, None, bad_code)
    with pytest.raises(RuntimeError, match="loss weight"):
        emu_backend._C.ppo_loss_forward(*[torch.zeros(3)] * 4, None, None, None, None, None, None, needs_weight)


def test_ppo_codes_match_the_python_table():
    """csrc/common/ppo_options.h spells the codes of kernels/ppo_options.py, the one table."""
    import re

    from rlfuse.kernels.ppo_options import KL_CODES, LOSS_AGG_CODES
    header = (ROOT / "csrc" / "common" / "ppo_options.h").read_text()
    found = {name: int(v) for name, v in re.findall(r"RLFUSE_(KL_\w+|AGG_\w+) = (\d+)", header)}
    want = {f"KL_{k.upper().replace('+', '_PLUS')}": v for k, v in KL_CODES.items()}
    want |= {f"AGG_{k.upper().replace('-', '_')}": v for k, v in LOSS_AGG_CODES.items()}
    assert found == want


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_c_options_table_is_generated_from_the_python_one():
    """csrc/common/ppo_options.h's GENERATED block is what kernels/ppo_options.py writes today
    (run `python -m rlfuse.kernels.ppo_options --write` after changing PPOLossOptions)."""
    from dataclasses import fields

    from rlfuse.kernels import ppo_options as O

    header = (ROOT / "csrc" / "common" / "ppo_options.h").read_text()
    assert O.header_with_table(header) == header, "stale: python -m rlfuse.kernels.ppo_options --write"
    # and the packing round-trips every field, absent ones included
    for opts in (O.PPOLossOptions(), O.PPOLossOptions(clip_eps_high=0.3, dual_clip=3.0, value_clip=None,
                                                       kl_estimator="k3+", loss_agg="seq-mean-token-sum-norm",
                                                       loss_agg_norm=64.0)):
        packed = opts.pack()
        assert len(packed) == 2 * len(fields(O.PPOLossOptions)) and O.PPOLossOptions.unpack(packed) == opts
