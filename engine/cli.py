"""``rlfuse`` command line.

    rlfuse sft      --data sft.jsonl         [common options]
    rlfuse rm       --data prefs.jsonl       [--ratings ratings.jsonl]
    rlfuse ppo      --prompts prompts.jsonl  [--reward-fn module:function] [--advantage gae|grpo|rloo]
    rlfuse pipeline --sft-data A --rm-data B [--prompts C] [--reward-fn module:function]
    rlfuse plot     RUN_DIR [--out DIR]
    rlfuse export   CHECKPOINT --out DIR [--adapter-only] [--role reward]   (HF / peft / seq-cls)
    rlfuse generate CHECKPOINT --prompts F --out F.jsonl [--temperature T]
    rlfuse chat     CHECKPOINT [--temperature T] [--system TEXT]
    rlfuse eval     --checkpoints A B ... --prompts F (--reward-fn M:F | --reward-checkpoint RM) [--out DIR]
    rlfuse memory   [--model tiny-small] [--batch-size 4] [--seq-len 128]   (= rlfuse bench --scenarios memory)
    rlfuse demo ... / rlfuse bench ...       (forwarded to their own modules)
    rlfuse label sample|serve|export|stats   (people rank responses; see rlfuse.engine.label)

Common options: --config FILE|PRESET, --set key=value (repeatable), --run-dir, --model,
--device, --seed, --max-steps, --resume, --no-progress, --split, --report-to. Precedence: defaults < config
file (or, with --resume, the run's saved config.yaml) < typed flags < --set.

This module imports nothing heavy at import time; torch/transformers load per command.
"""

from __future__ import annotations

import argparse
import os
import sys

TRAIN_VERBS = ("sft", "rm", "ppo", "pipeline")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file or bundled preset name (e.g. tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set ppo.kl_coef=0.02 (repeatable)")
    p.add_argument("--run-dir", help="run directory (config, metrics, checkpoints, samples, summary)")
    p.add_argument("--model", help="'tiny', a local HF model directory, or a .gguf file")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps (PPO: iterations) for this stage")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--split", help="split of a datasets folder given as data (config key data.split)")
    p.add_argument("--report-to", help="none | tensorboard | wandb | tensorboard,wandb (config key report_to)")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="run data-parallel on N processes (re-launches this command under torchrun)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlfuse", description="Single-GPU RLHF on one shared LoRA backbone.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sft", help="supervised fine-tuning of the sft adapter")
    _common(p)
    p.add_argument("--data", help="JSONL of {prompt, response} or {messages}")

    p = sub.add_parser("rm", help="train the reward adapter + reward head")
    _common(p)
    p.add_argument("--data", help="JSONL of {prompt, chosen, rejected} (rating lines allowed)")
    p.add_argument("--ratings", help="JSONL of {prompt, response, score}")

    for name, help_ in (("ppo", "PPO / GRPO / RLOO against a reward model or reward function"),
                        ("pipeline", "sft -> rm -> ppo in one run directory")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--prompts", help="JSONL of {prompt} or {messages}")
        p.add_argument("--reward-fn", help="Python reward: module:function or file.py:function")
        p.add_argument("--advantage", help="advantage estimator: gae, grpo, rloo (engine/advantages.py's registry)")
        p.add_argument("--n-samples", type=int, help="completions per prompt (grpo/rloo need >= 2)")
        if name == "pipeline":
            p.add_argument("--sft-data", help="SFT JSONL")
            p.add_argument("--rm-data", help="preference JSONL")

    p = sub.add_parser("plot", help="draw training curves of a run to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")

    p = sub.add_parser("memory", help="peak memory of one PPO step: shared backbone vs four models "
                                      "(rlfuse bench --scenarios memory)")
    p.add_argument("--model", default="tiny-small")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)

    _after_training_verbs(sub)
    _eval_verb(sub)
    sub.add_parser("demo", help="run the demo (see rlfuse.engine.demo)", add_help=False)
    sub.add_parser("label", help="people rank responses: sample | serve | export | stats", add_help=False)
    sub.add_parser("bench", help="run the benchmark scenarios (rlfuse bench --list; see rlfuse.benchmarks)",
                   add_help=False)
    return parser


def _after_training_verbs(sub) -> None:
    """export / generate / chat: use what a run trained (engine/export.py, generate.py, chat.py)."""
    def checkpoint_args(p):
        p.add_argument("checkpoint", help="a checkpoint folder, a stage folder (its latest) or a run folder")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as the run trained)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the run's saved config, e.g. model.quantization=none")

    p = sub.add_parser("export", help="write a checkpoint as a HF model, a peft adapter or a seq-cls reward model")
    checkpoint_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--role", choices=["policy", "reward"], default="policy")
    p.add_argument("--adapter-only", action="store_true", help="a peft adapter folder instead of merged weights")
    p.add_argument("--base-model", help="base_model_name_or_path written into the adapter's config")
    p.add_argument("--dtype", default="auto", help="auto (the base's own dtype) | float32 | bfloat16 | float16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = sub.add_parser("generate", help="completions of a prompt file from a trained policy (JSONL out)")
    checkpoint_args(p)
    p.add_argument("--prompts", required=True, help="prompts: JSONL of {prompt} or {messages}")
    p.add_argument("--out", required=True, help="output JSONL")
    _sampling_args(p, max_new_tokens=128, batch_size=8)
    p.add_argument("--split", help="split of a datasets folder given as --prompts (data.split)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")

    p = sub.add_parser("chat", help="talk to a trained policy in the terminal")
    checkpoint_args(p)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0, as PPO samples)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", help="system message")
    p.add_argument("--seed", type=int, default=0)


def _sampling_args(p, *, max_new_tokens: int, batch_size: int) -> None:
    """How generate and eval draw answers from the engine's sampler."""
    p.add_argument("--temperature", type=float, help="sample softmax(logits/T); default (or 0): greedy")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--n-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)


def _eval_verb(sub) -> None:
    """rlfuse eval: checkpoints answer the same prompts; scored, compared pairwise (engine/evaluate.py)."""
    p = sub.add_parser("eval", help="compare checkpoints on the same prompts (accuracy, reward, KL, paired CIs)")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint, stage or run folders of one base model ('base': the bare base model)")
    p.add_argument("--prompts", required=True, help="prompts: JSONL of {prompt} or {messages}")
    p.add_argument("--reward-fn", help="score answers with a Python function: module:function or file.py:function")
    p.add_argument("--reward-checkpoint", help="score answers with a trained reward model (an rm stage or run folder)")
    p.add_argument("--reference", help="the KL's reference: a checkpoint or 'base' (default: the run's sft, else base)")
    p.add_argument("--success", type=float, default=1.0, help="an answer counts as right when its reward is >= this")
    _sampling_args(p, max_new_tokens=64, batch_size=32)
    p.add_argument("--out", help="folder for eval.json, eval.md and answers.jsonl")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the runs' saved config, e.g. model.quantization=none")


def _typed_overrides(args) -> dict:
    """Typed flags -> dotted config keys for this verb."""
    verb = args.command
    section = {"sft": "sft", "rm": "rm", "ppo": "ppo", "pipeline": "ppo"}[verb]
    pairs = {
        "run_dir": args.run_dir, "model.name_or_path": args.model, "device": args.device, "seed": args.seed,
        f"{section}.max_steps": args.max_steps,
    }
    if verb in ("sft", "rm"):
        pairs[f"{verb}.data"] = args.data
    if verb == "rm":
        pairs["rm.ratings"] = args.ratings
    if verb in ("ppo", "pipeline"):
        pairs.update({"ppo.prompts": args.prompts, "ppo.reward_fn": args.reward_fn,
                      "ppo.advantage": args.advantage, "ppo.n_samples": args.n_samples})
    if verb == "pipeline":
        pairs.update({"sft.data": args.sft_data, "rm.data": args.rm_data})
    if args.split is not None:
        pairs["data.split"] = args.split
    if args.report_to is not None:
        pairs["report_to"] = args.report_to
    if args.resume:
        pairs["resume"] = True
    if args.no_progress:
        pairs["progress"] = False
    return {k: v for k, v in pairs.items() if v is not None}


def make_config(args):
    from pathlib import Path

    from .config import apply_overrides, load_config

    typed = _typed_overrides(args)
    cfg = load_config(args.config)
    apply_overrides(cfg, typed)
    apply_overrides(cfg, args.overrides)
    # a stage resumes with its own saved config (a later stage may have rewritten the top-level one)
    saved = Path(cfg.run_dir) / args.command / "config.yaml"
    if args.command == "pipeline" or not saved.is_file():
        saved = Path(cfg.run_dir) / "config.yaml"
    if args.resume and args.config is None and saved.is_file():  # continue with the run's own config
        try:
            cfg = load_config(saved)
        except ValueError as exc:
            where = "" if str(saved) in str(exc) else f"{saved}: "
            raise ValueError(f"{where}{exc}; --resume reads this saved config: repair it, or pass --config "
                             "with the run's settings") from None
        apply_overrides(cfg, typed)
        apply_overrides(cfg, args.overrides)
    return cfg


def _run_train(args) -> int:
    from .config import validate
    from .runlock import lock_run_dir

    from .stop import sigterm_as_interrupt

    cfg = validate(make_config(args))  # bad numbers fail here, before any model loads
    with sigterm_as_interrupt():  # `kill` ends a run as Ctrl-C does: message, lock released
        if int(os.environ.get("RANK", "0")) == 0:  # one lock for the whole command (a pipeline's three stages)
            with lock_run_dir(cfg.run_dir):  # also refuses a run directory that cannot be written
                return _train(args, cfg)
        return _train(args, cfg)


def _train(args, cfg) -> int:
    if args.command == "sft":
        from .sft import train_sft as run
        result = run(cfg)
    elif args.command == "rm":
        from .reward import train_reward as run
        result = run(cfg)
    elif args.command == "ppo":
        from .ppo import train_ppo as run
        result = run(cfg)
    else:
        from .pipeline import run_pipeline as run
        result = run(cfg)
    import json

    from .distributed import barrier, shutdown, world

    if world().is_main:  # data-parallel ranks ran the same job: one report
        print(json.dumps(result, indent=2, default=str))
        print(f"[rlfuse] run directory: {cfg.run_dir}")
    barrier()  # every rank done (rank 0's last checkpoint written) before the group goes away
    shutdown()
    return 0


def _launch_data_parallel(nproc: int, argv: list[str]) -> int:
    """``rlfuse <verb> --nproc-per-node N ...`` -> the same command on N torchrun processes."""
    import subprocess

    from .distributed import launched_by_torchrun, torchrun_command

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    rest, skip = [], False
    for a in argv:  # drop the flag itself so the ranks don't launch again
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    if launched_by_torchrun():
        raise ValueError("--nproc-per-node given inside a torchrun job: use one or the other")
    from .stop import Terminated, sigterm_as_interrupt

    with sigterm_as_interrupt():
        proc = subprocess.Popen(torchrun_command(nproc, rest))
        try:
            rc = proc.wait()
        except Terminated:  # `kill` of this launcher: torchrun passes SIGTERM to every rank, and
            proc.terminate()  # rank 0 says where the run stopped, as a single process does
            proc.wait()
            return Terminated.exit_code
        except BaseException:  # Ctrl-C and the rest: as subprocess.call did
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        print(f"rlfuse: error: a data-parallel rank failed (exit {rc}); see its message above. "
              "The last complete checkpoint is kept: continue with --resume", file=sys.stderr)
    return rc


def _dispatch(module: str, argv: list[str], what: str) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):  # the module itself is missing, not a dependency
            raise ValueError(f"'rlfuse {what}' is not available: {module} is not installed in this build") from None
        raise
    result = mod.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # demo/bench parse their own arguments
        if argv and argv[0] == "demo":
            return _dispatch("rlfuse.engine.demo", argv[1:], "demo")
        if argv and argv[0] == "label":
            return _dispatch("rlfuse.engine.label.cli", argv[1:], "label")
        if argv and argv[0] == "bench":
            return _dispatch("rlfuse.benchmarks.runner", argv[1:], "bench")
        args = build_parser().parse_args(argv)
        if args.command in TRAIN_VERBS and args.nproc_per_node is not None:
            return _launch_data_parallel(args.nproc_per_node, argv)
        if args.command in TRAIN_VERBS:
            return _run_train(args)
        if args.command == "export":
            from .export import main as export_main

            return export_main(args)
        if args.command in ("generate", "chat", "eval"):
            import importlib

            module = {"eval": "evaluate"}.get(args.command, args.command)
            return importlib.import_module(f".{module}", __package__).main(args)
        if args.command == "plot":
            from .plot import plot_run

            for path in plot_run(args.run_dir, args.out):
                print(path)
            return 0
        if args.command == "memory":  # an alias: the benchmarks' memory scenario
            size = f"memory:model={args.model},batch_size={args.batch_size},seq_len={args.seq_len}"
            device = [] if args.device == "auto" else ["--device", args.device]
            return _dispatch("rlfuse.benchmarks.runner", ["--scenarios", "memory", "--sizes", size, *device], "memory")
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the last checkpoint is intact; say where we were
        from .stage import interrupted_message, release_active
        from .stop import stop_reason

        print(f"\nrlfuse: {interrupted_message(stop_reason(exc))}", file=sys.stderr)
        release_active()
        return getattr(exc, "exit_code", 130)
    except (ValueError, FileNotFoundError) as exc:  # user errors: message, no traceback
        if os.environ.get("RLFUSE_DEBUG"):
            raise
        print(f"rlfuse: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rlfuse label stats | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not fail again
        return 141  # 128 + SIGPIPE, as for any command whose reader went away
    except OSError as exc:  # the filesystem failed us (disk full, read-only, a file where a folder goes)
        if os.environ.get("RLFUSE_DEBUG"):
            raise
        from .stage import active_stage_message, release_active
        from .stop import os_error_message

        where = active_stage_message("stopped")
        print(f"rlfuse: error: {os_error_message(exc)}" + (f"; {where}" if where else ""), file=sys.stderr)
        release_active()
        return 2


if __name__ == "__main__":
    sys.exit(main())
