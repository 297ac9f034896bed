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
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PACKAGE_DIR = {
    "rlfuse.kernels": "kernels",
    "rlfuse.engine": "engine",
    "rlfuse.integrations": "kernels/integrations",
    "rlfuse.benchmarks": "benchmarks",
}


# The mapped root folders (kernels/, engine/, benchmarks/) hold no __init__.py: from the repository
# root (the current directory is sys.path[0] under `python -m` and `python -c`) a regular package
# named `kernels` there would shadow Hugging Face's `kernels`, which transformers imports, and
# `engine`/`benchmarks` would shadow any installed package of those names. A folder without an
# __init__.py loses to an installed regular package (PEP 420). Each root's package init lives in
# ROOT_INIT and is installed as that package's __init__.py.
ROOT_INIT = "_package_init.py"


def _packages():
    """Every package folder under the mapped roots, named on the namespace."""
    found = []
    for name, root in PACKAGE_DIR.items():
        for dirpath, _dirs, files in os.walk(root):
            is_package = "__init__.py" in files or (dirpath == root and ROOT_INIT in files)
            if not is_package or "__pycache__" in dirpath:
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


class BuildPyRootInit(build_py):
    """Install each mapped root's ROOT_INIT as its package's __init__.py (and not under its own
    name). The output mapping keeps pointing at the source file, so a strict editable install
    links it instead of copying it: edits show at once."""

    @staticmethod
    def _root_init(package, package_dir):
        path = os.path.join(package_dir, ROOT_INIT)
        return path if package in PACKAGE_DIR and os.path.isfile(path) else None

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        root_init = self._root_init(package, package_dir)
        if root_init:
            modules = [m for m in modules if m[1] != ROOT_INIT[:-3]] + [(package, "__init__", root_init)]
        return modules

    def check_package(self, package, package_dir):
        return self._root_init(package, package_dir) or super().check_package(package, package_dir)


class StrictEditableWheel(editable_wheel):
    """Editable installs as a link tree (setuptools' "strict" mode): the default "lenient" finder
    maps rlfuse.kernels straight onto kernels/ and looks for kernels/__init__.py there, which
    must not exist (see ROOT_INIT). The link tree holds the installed layout, each file a link
    to its source; a new source file needs `pip install -e .` again."""

    def initialize_options(self):
        super().initialize_options()
        self.mode = "strict"


ext_modules, cmdclass = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyRootInit, "editable_wheel": StrictEditableWheel}

setup(
    package_dir=PACKAGE_DIR,
    packages=_packages(),
    package_data={"rlfuse.engine": ["presets/*.yaml"], "rlfuse.engine.label": ["page.html"],
                  "rlfuse.benchmarks": ["results/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
