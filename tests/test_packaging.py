"""The repository's folders never shadow installed packages, and rlfuse installs whole.

`python -m` and `python -c` put the current directory first on sys.path, so from the repository
root a folder with an ``__init__.py`` named ``kernels`` would be imported instead of Hugging
Face's ``kernels`` (transformers imports it). The mapped roots therefore hold no ``__init__.py``;
setup.py installs each root's ``_package_init.py`` as its package's ``__init__.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("kernels", "engine", "benchmarks")


def _python(code, cwd, env=None):
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("root", ROOTS)
def test_root_folders_are_not_regular_packages(root):
    assert not (REPO / root / "__init__.py").exists(), f"{root}/__init__.py would shadow `import {root}`"
    assert (REPO / root / "_package_init.py").is_file()


def test_top_level_names_from_the_repo_root_are_not_ours():
    code = ("import importlib, json\n"
            "out = {}\n"
            f"for name in {ROOTS!r}:\n"
            "    try:\n"
            "        m = importlib.import_module(name)\n"
            "    except ImportError:\n"
            "        out[name] = None; continue\n"
            "    out[name] = [getattr(m, '__file__', None), list(getattr(m, '__path__', []))]\n"
            "print(json.dumps(out))")
    found = json.loads(_python(code, cwd=REPO))
    for name, where in found.items():
        if where is None:
            continue
        file, paths = where
        # either an installed package (a virtual environment may live inside the checkout, as CI's
        # does), or a PEP 420 namespace with no code of ours
        assert file is None or not Path(file).resolve().is_relative_to(REPO / name), (name, file)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's `kernels` is not installed")
def test_import_kernels_from_the_repo_root_gives_hugging_faces_package():
    file = _python("import kernels; print(kernels.__file__)", cwd=REPO)
    assert file and not Path(file).resolve().is_relative_to(REPO / "kernels"), file
    # what transformers 5.x does at import when `kernels` is installed
    _python("import kernels; from transformers.integrations import hub_kernels", cwd=REPO)


def test_the_cli_runs_as_a_module_from_the_repo_root(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n"
                            for w in ("red", "blue", "green", "cat")))
    proc = subprocess.run([sys.executable, "-m", "rlfuse.engine.cli", "sft", "--data", str(data),
                           "--run-dir", str(tmp_path / "run"), "--model", "tiny", "--device", "cpu",
                           "--no-progress", "--set", "sft.max_steps=1", "--set", "sft.batch_size=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists() or any((tmp_path / "run").iterdir())


def test_rlfuse_kernels_is_a_regular_package_with_its_api():
    import rlfuse.kernels as K

    assert Path(K.__file__).name == "__init__.py"
    assert callable(K.gae) and callable(K.linear_logprobs) and "torch" in K.available_backends()


@pytest.mark.slow
def test_a_non_editable_wheel_installs_every_package_init(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(wheels), str(REPO)], check=True, timeout=900,
                   env={**os.environ, "RLFUSE_NO_EXTENSIONS": "1"}, capture_output=True)
    (wheel,) = wheels.glob("rlfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("rlfuse/kernels", "rlfuse/engine", "rlfuse/benchmarks"):
        assert f"{pkg}/__init__.py" in names and f"{pkg}/_package_init.py" not in names
    assert "rlfuse/integrations/__init__.py" in names and "rlfuse/engine/presets/tiny.yaml" in names
    assert not any(n.startswith(("kernels/", "engine/", "rlfuse/__init__")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import rlfuse.kernels as K, rlfuse.engine as E, rlfuse.integrations.trl\n"
            "assert K.__file__.startswith(sys.argv[1]), K.__file__\n"
            "assert E.load_config('tiny').model.name_or_path\n"
            "print(K.available_backends())")
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout


def test_constraints_pin_everything_but_the_torch_build():
    lines = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    names = []
    for ln in lines:
        name, sep, version = ln.partition("==")
        assert sep and name and version and " " not in ln, ln
        names.append(name)
    assert {"transformers", "peft", "bitsandbytes", "trl", "accelerate", "kernels"} <= set(names)
    assert not {"torch", "triton", "rlfuse"} & set(names)
    assert len(names) == len(set(names))


def test_an_editable_install_sees_a_new_source_file_at_once(tmp_path):
    import rlfuse.engine

    if not Path(rlfuse.engine.__file__).is_symlink():
        pytest.skip("not an editable install (rlfuse.engine's __init__.py is not a link to the source)")
    probe = REPO / "engine" / f"_probe_{os.getpid()}.py"
    probe.write_text("VALUE = 42\n")
    try:
        out = _python(f"import rlfuse.engine._probe_{os.getpid()} as m; print(m.VALUE, m.__file__)", cwd=tmp_path)
    finally:
        probe.unlink()
    value, file = out.split()
    assert value == "42" and Path(file).resolve() == probe.resolve()
