"""Build script: maps the source folders onto the ``rlfuse`` namespace and builds the
C++ (CPU) and, where a CUDA toolchain and a CUDA build of torch exist, CUDA extensions.

Both extensions are optional: a failed build leaves a working ``rlfuse.kernels`` on the
torch (and triton) backends, and ``rlfuse.kernels.available_backends()`` says which exist.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch you
already have instead of downloading another.
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

PACKAGE_DIR = {
    "rlfuse.kernels": "kernels",
    "rlfuse.engine": "engine",
    "rlfuse.integrations": "kernels/integrations",
    "rlfuse.benchmarks": "benchmarks",
}


def _packages():
    """Every folder with an __init__.py under the mapped roots, named on the namespace."""
    found = []
    for name, root in PACKAGE_DIR.items():
        for dirpath, _dirs, files in os.walk(root):
            if "__init__.py" not in files or "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, root)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            # kernels/integrations is published as rlfuse.integrations, not twice
            if pkg.startswith("rlfuse.kernels.integrations"):
                continue
            found.append(pkg)
    return sorted(found)


def _extensions():
    if os.environ.get("RLFUSE_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building without C++/CUDA kernels")
        return [], {}

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("RLFUSE_PORTABLE") != "1" and sys.platform.startswith("linux"):
        cxx.append("-march=native")  # the build machine is the machine that runs it
    exts = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        exts.append(
            CppExtension(
                "rlfuse.kernels._C",
                cpu_sources,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        )
    want_cuda = os.environ.get("RLFUSE_BUILD_CUDA", "auto")
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    if want_cuda != "0" and torch.version.cuda and has_nvcc:
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        if cu_sources:
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
            nvcc = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
            if not arch:
                nvcc += ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
            exts.append(
                CUDAExtension(
                    "rlfuse.kernels._C_cuda",
                    cu_sources,
                    extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc},
                )
            )

    class OptionalBuildExt(BuildExtension):
        """Never fail the install because a kernel did not compile: warn and go on."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                warnings.warn(f"rlfuse: building {ext.name} failed ({exc}); that backend is unavailable")

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    package_dir=PACKAGE_DIR,
    packages=_packages(),
    package_data={"rlfuse.engine": ["presets/*.yaml"], "rlfuse.engine.label": ["page.html"],
                  "rlfuse.benchmarks": ["results/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
