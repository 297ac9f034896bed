"""Load what a run trained, for use after training (export, generate, chat).

A CHECKPOINT argument may be a checkpoint folder (``<run>/<stage>/ckpt-N``), a stage folder
(its latest checkpoint) or a run folder (the latest checkpoint of the stage that trained the
role asked for: ppo, else sft for the policy; rm for the reward model).

What a checkpoint holds is read from its files, not its folder name: heads.safetensors with a
``reward_head`` means a reward model (the ``reward`` adapter + head); anything else is a
language-model adapter (sft or ppo policy). The base model and LoRA shape come from the run's
saved config (``<stage>/config.yaml``, else ``<run>/config.yaml``), so the backbone is rebuilt
exactly as the stage trained it (same dtype and quantization rules on the same kind of machine;
``--set model.quantization=4bit`` etc. change them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CKPT_FILES, LATEST, checkpoint_loads, latest_checkpoint, load_heads, load_into_backbone

ROLES = ("policy", "reward")
_STAGES_FOR = {"policy": ("ppo", "sft"), "reward": ("rm",)}


@dataclass
class Trained:
    backbone: object  # engine.backbone.Backbone, in eval mode, the role's adapter loaded
    adapter: str  # "policy" or "reward"
    checkpoint: Path
    cfg: object  # the run's RunConfig (overrides applied)


def _is_stage_dir(p: Path) -> bool:
    return (p / LATEST).is_file() or any(c.is_dir() for c in p.glob("ckpt-*"))


def find_checkpoint(path, role: str = "policy") -> Path:
    """The checkpoint folder ``path`` means for ``role``, checked complete (one-line errors)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (use {' or '.join(ROLES)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise ValueError(f"{p}: expected a checkpoint, stage or run folder, got a file")
    if any((p / f).exists() for f in CKPT_FILES):  # a checkpoint folder itself
        ckpt = p
    elif _is_stage_dir(p):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ValueError(f"{p}: no complete checkpoint in this stage folder (interrupted before its first save?)")
    else:
        stages = [s for s in _STAGES_FOR[role] if latest_checkpoint(p / s) is not None]
        if not stages:
            raise FileNotFoundError(f"{p}: no {role} checkpoint found (looked for a checkpoint, a stage folder, or "
                                    f"a run folder with {' or '.join(_STAGES_FOR[role])}/)")
        ckpt = latest_checkpoint(p / stages[0])
    missing = [f for f in CKPT_FILES if not (ckpt / f).is_file()]
    if missing:
        raise ValueError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    if not checkpoint_loads(ckpt):
        raise ValueError(f"{ckpt}: incomplete checkpoint, a file is truncated or unreadable")
    return ckpt


def checkpoint_role(ckpt: Path) -> str:
    """"reward" when the checkpoint carries a reward head, else "policy"."""
    return "reward" if any(k.startswith("reward_head.") for k in load_heads(ckpt)) else "policy"


def run_config(ckpt: Path, overrides=None):
    """The config the checkpoint's stage ran with (its own copy first), overrides applied."""
    from .config import apply_overrides, load_config

    for candidate in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return apply_overrides(load_config(candidate), overrides)
    raise FileNotFoundError(f"{ckpt}: no config.yaml in its stage or run folder, so the base model is unknown "
                            "(keep the checkpoint inside its run directory)")


def load_trained(path, role: str = "policy", *, device: str = "cpu", overrides=None) -> Trained:
    """The backbone with the trained ``role`` adapter (and, for the reward model, its head) loaded."""
    from .backbone import load_backbone

    ckpt = find_checkpoint(path, role)
    have = checkpoint_role(ckpt)
    if have != role:
        hint = ("a reward model is exported with `rlfuse export --role reward`" if have == "reward"
                else "drop --role reward")
        raise ValueError(f"{ckpt} holds a {have} checkpoint, not a {role} one ({hint})")
    cfg = run_config(ckpt, overrides)
    backbone = load_backbone(cfg.model, device=device, adapters=[role])
    load_into_backbone(backbone, ckpt, role, {"reward_head": backbone.reward_head} if role == "reward" else None)
    backbone.train(False)  # eval: every dropout is off
    backbone.model.set_adapter(role)
    return Trained(backbone, role, ckpt, cfg)
