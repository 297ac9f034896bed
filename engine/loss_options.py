"""PPO's loss options are the kernel's own object (``rlfuse.kernels.ppo_options.PPOLossOptions``).

The engine does not re-declare or re-check them: each field of the kernel's table is a
``ppo.<field>`` config key (``CONFIG_OPTIONS``; a test fails when a new field has no key),
except the two the step sets itself (``STEP_OPTIONS``). The config is checked, before any
model loads, by making the kernel's object from it, so the engine and the kernel have one rule.
"""

from __future__ import annotations

from dataclasses import fields

from rlfuse.kernels.ppo_options import PPOLossOptions

# set per step: the KL controller's coefficient (0 when the KL is a reward penalty), and Dr. GRPO's
# constant normaliser of seq-mean-token-sum-norm, which is the generation budget max_new_tokens
STEP_OPTIONS = ("kl_coef", "loss_agg_norm")
CONFIG_OPTIONS = tuple(f.name for f in fields(PPOLossOptions) if f.name not in STEP_OPTIONS)
# "auto" in the config, resolved from the advantage estimator's traits (ppo.resolve_loss_options)
AUTO_OPTIONS = ("kl_estimator", "loss_agg")
_KERNEL_DEFAULTS = {f.name: f.default for f in fields(PPOLossOptions)}


def loss_options(c, *, kl_coef: float = 0.0) -> PPOLossOptions:
    """The kernel's options for PPO config ``c``, or a one-line ValueError naming ``ppo.<key>``.
    An unresolved "auto" is checked as the kernel's default (its resolution is always valid)."""
    values = {name: getattr(c, name) for name in CONFIG_OPTIONS}
    for name in AUTO_OPTIONS:
        if values[name] == "auto":
            values[name] = _KERNEL_DEFAULTS[name]
    norm = float(c.max_new_tokens) if values["loss_agg"] == "seq-mean-token-sum-norm" else None
    try:
        return PPOLossOptions(**values, kl_coef=kl_coef, loss_agg_norm=norm)
    except ValueError as exc:
        raise ValueError(f"ppo.{exc}") from None


def check_loss_options(c) -> None:
    """``loss_options``' check in the config's error style: ``config key 'ppo.<key>': ...``."""
    try:
        loss_options(c)
    except ValueError as exc:
        message = str(exc)[len("ppo."):]
        words = message.replace(";", " ").split()
        key = next((f"ppo.{w}" for w in words if w in CONFIG_OPTIONS), "ppo")  # the kernel names its field
        raise ValueError(f"config key '{key}': {message}") from None
