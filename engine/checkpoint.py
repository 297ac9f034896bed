"""Checkpoints that survive a kill at any instant.

Every file is written to a temporary file in the same directory and moved into place
with ``os.replace`` (atomic on POSIX), so a reader sees either the old file or the new
one, never half of one. A checkpoint is a folder ``<stage_dir>/ckpt-<step>``; the text
file ``<stage_dir>/latest`` names the newest complete one and is written last, so a
kill while a checkpoint folder is being filled leaves ``latest`` on the previous one. Should
``latest`` still name a folder that is gone or unreadable (deleted by hand, a truncated
copy), :func:`latest_checkpoint` falls back to the newest checkpoint whose files load.
Nothing non-finite is ever saved: a NaN weight or moment raises before any file is written.

Layout of one checkpoint folder:
    adapter_model.safetensors + adapter_config.json   the trained LoRA adapter (peft format)
    heads.safetensors                                  value / reward head weights, if any
    trainer_state.pt                                   step, optimizer, RNG, stage extras
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

LATEST = "latest"


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` then move tmp over ``path``; on any failure leave no tmp behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (so may a writer); give what open() would
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    # safetensors wants contiguous tensors that own their storage
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch_atomic(obj: Any, path) -> Path:
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def load_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints

CKPT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.pt")


def checkpoint_loads(ckpt: Path) -> bool:
    """Every file of the checkpoint is present and parses (a truncated file does not)."""
    from safetensors import safe_open

    try:
        if not all((ckpt / f).is_file() for f in CKPT_FILES):
            return False
        for name in ("adapter_model.safetensors", "heads.safetensors"):
            if (ckpt / name).is_file():
                with safe_open(str(ckpt / name), framework="pt") as fh:
                    for key in fh.keys():
                        fh.get_tensor(key)
        if not isinstance(json.loads((ckpt / "adapter_config.json").read_bytes()), dict):
            return False
        state = load_trainer_state(ckpt)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return False
        if "rng" in state:  # a state that unpickles can still hold damaged RNG tuples: restore them
            # into scratch generators, so resume falls back to an older checkpoint instead of failing
            random.Random().setstate(state["rng"]["python"])
            torch.Generator().set_state(state["rng"]["torch"])
        return "optimizer" not in state or isinstance(state["optimizer"], dict)
    except Exception:  # any parse error means "not a usable checkpoint"
        return False


def latest_checkpoint(stage_dir, *, verify: bool = False) -> Path | None:
    """The newest complete checkpoint folder of a stage, or None: the one ``latest`` names,
    or, if that folder is missing or incomplete, the newest that is complete. ``verify``
    also loads every file (resume does: a truncated file must not be resumed from)."""
    stage_dir = Path(stage_dir)
    ok = checkpoint_loads if verify else (lambda c: all((c / f).is_file() for f in CKPT_FILES))
    name = latest_pointer(stage_dir)
    if name is not None and _is_ckpt_name(name):
        ckpt = stage_dir / name
        if ok(ckpt):
            return ckpt
    for ckpt in sorted((p for p in stage_dir.glob("ckpt-*") if p.is_dir()), reverse=True):
        if ok(ckpt):
            return ckpt
    return None


def latest_pointer(stage_dir) -> str | None:
    """The folder name ``latest`` holds, if any (to report a fallback). A pointer that is not
    text (overwritten with binary garbage) is returned escaped, so it names no checkpoint and
    the caller falls back as it does for a missing folder."""
    pointer = Path(stage_dir) / LATEST
    if not pointer.is_file():
        return None
    try:
        raw = pointer.read_bytes()
    except OSError:
        return "<unreadable>"
    return raw.decode("utf-8", errors="backslashreplace").strip()[:200]


def _is_ckpt_name(name: str) -> bool:
    # a bare folder name: "ckpt-" then digits, never a path that leaves the stage folder
    return name.startswith("ckpt-") and name[5:].isdigit()


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, read-only...); the previous one is intact."""


def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise (before anything is written) if a floating tensor holds NaN or +-inf."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save a non-finite checkpoint: {what} tensor {name!r} holds NaN or inf")


def _optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for pid, slots in state.get("optimizer", {}).get("state", {}).items():
        for slot, t in slots.items():
            if isinstance(t, torch.Tensor):
                out[f"{pid}.{slot}"] = t
    return out


def resolve_checkpoint(path) -> Path:
    """Accept a stage folder (follow ``latest``) or a checkpoint folder."""
    p = Path(path)
    if (p / "adapter_model.safetensors").is_file():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found at {p} (expected a stage folder with a '{LATEST}' file "
                                "or a folder holding adapter_model.safetensors)")
    return ckpt


def save_checkpoint(stage_dir, step: int, *, adapter: dict[str, torch.Tensor], adapter_config: dict,
                    heads: dict[str, torch.Tensor] | None, trainer_state: dict, keep: int = 2) -> Path:
    stage_dir = Path(stage_dir)
    assert_finite(adapter, "adapter")
    assert_finite(heads or {}, "head")
    assert_finite(_optimizer_tensors(trainer_state), "optimizer state")
    ckpt = stage_dir / f"ckpt-{step:07d}"
    existed = ckpt.exists()
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(adapter, ckpt / "adapter_model.safetensors",
                                metadata={"format": "pt", "step": str(step)})
        write_json_atomic(ckpt / "adapter_config.json", adapter_config)
        if heads:
            save_safetensors_atomic(heads, ckpt / "heads.safetensors", metadata={"step": str(step)})
        save_torch_atomic(trainer_state, ckpt / "trainer_state.pt")
        write_text_atomic(stage_dir / LATEST, ckpt.name)  # the commit point
    except OSError:
        if not existed:  # a half-filled new folder helps no one and holds space the user needs
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    _prune(stage_dir, keep=max(1, keep), current=ckpt.name)
    return ckpt


def _prune(stage_dir: Path, keep: int, current: str) -> None:
    ckpts = sorted(p for p in stage_dir.glob("ckpt-*") if p.is_dir())
    for old in ckpts[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt) -> dict:
    # our own file: it holds optimizer state and Python RNG tuples, so not weights_only
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_heads(ckpt) -> dict[str, torch.Tensor]:
    p = Path(ckpt) / "heads.safetensors"
    return load_safetensors(p) if p.is_file() else {}


def load_into_backbone(backbone, ckpt, adapter: str, heads: dict | None = None) -> Path:
    """A checkpoint's LoRA tensors into ``adapter`` of ``backbone``, and for each ``name: module``
    of ``heads`` the tensors saved as ``<name>.<key>`` in its heads.safetensors: the one way a
    checkpoint is loaded (resume, the PPO roles, the reward model's SFT start, the demo,
    sampling for labels, export). Returns the checkpoint folder."""
    ckpt = Path(ckpt)
    backbone.load_adapter_state_dict(adapter, load_safetensors(ckpt / "adapter_model.safetensors"))
    if heads:
        saved = load_heads(ckpt)
        for name, module in heads.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")})
    return ckpt
