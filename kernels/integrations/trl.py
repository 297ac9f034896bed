"""rlfuse inside TRL 1.x: drop-in log-prob/entropy functions and a reversible patch.

Drop-ins (need only torch; TRL need not be installed)::

    from rlfuse.integrations.trl import selective_log_softmax, entropy_from_logits
    logp = selective_log_softmax(logits, completion_ids)          # TRL's signature
    ent = entropy_from_logits(logits)

The patch (needs TRL)::

    import rlfuse.integrations.trl as rt
    rt.patch()      # TRL's fused LM head and log-prob helpers now run on rlfuse
    ...             # GRPOTrainer / RLOOTrainer / KTOTrainer / DPOTrainer / SFTTrainer as usual
    rt.unpatch()    # TRL's own objects are back (identity-equal)
    with rt.patched(): ...

What is patched, in every ``trl`` / ``trl.*`` module already imported that holds TRL's
object under that name:

* ``_ChunkedLogProbFunction`` (``trl.trainer.utils``): what ``add_fused_lm_head``'s
  ``model(..., labels=..., fused_lm_head=True)`` calls to turn hidden states into
  ``log_probs`` / ``entropy`` / ``mean_logits``. Replaced by :class:`RlfuseChunkedLogProb`,
  which runs :func:`rlfuse.kernels.linear_logprobs` (soft-capping and logit scales included)
  and falls back to TRL's own function, saying so once in the log, for what rlfuse does not
  compute (the ``log_sum_sq_probs`` / ``is_top1`` outputs, DeepSpeed ZeRO-3 partitioned heads).
* ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy``.

Only the ``trl`` package's modules are touched; a module imported after ``patch()`` gets
rlfuse's objects through TRL's own imports and is restored by ``unpatch()`` too.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import sys
import threading
from collections import Counter

import torch
from torch import Tensor

import rlfuse.kernels as _K

from ._common import as_out_dtype, check_out_dtype, check_temperature, exact_logp_entropy

__all__ = [
    "RlfuseChunkedLogProb",
    "entropy_from_logits",
    "is_patched",
    "patch",
    "patch_stats",
    "patched",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

# --------------------------------------------------------------------------------------
# Drop-ins with TRL's signatures
# --------------------------------------------------------------------------------------


def _logp_entropy(logits: Tensor, index: Tensor, temperature: float, row_mask: Tensor | None,
                  with_entropy: bool):
    """One rlfuse pass: log-probs at ``index`` ([...] or [..., K]) and optionally entropy."""
    check_temperature(temperature)
    squeeze = index.dim() == logits.dim() - 1
    idx = index if not squeeze else index.unsqueeze(-1)
    keep = None
    if row_mask is not None:
        keep = row_mask != 0  # shape of ``index``
        idx = idx.masked_fill(~(keep.unsqueeze(-1) if squeeze else keep), 0)  # still a valid label
    first = idx[..., 0]
    if logits.dtype == torch.float64:
        logp0, entropy = exact_logp_entropy(logits, first, float(temperature), with_entropy)
    else:
        out = _K.logprobs_from_logits(logits, first, temperature=float(temperature),
                                      return_entropy=with_entropy)
        logp0, entropy = out if with_entropy else (out, None)
    if idx.shape[-1] == 1:
        logp = logp0.unsqueeze(-1)
    else:
        # log p_k = z_k - lse = log p_0 + (z_k - z_0): the K gathers reuse one log-sum-exp
        z = logits.gather(-1, idx).to(logp0.dtype) / temperature
        logp = logp0.unsqueeze(-1) + (z - z[..., :1])
    if squeeze:
        logp = logp.squeeze(-1)
    if keep is not None:
        logp = logp.masked_fill(~keep, 0.0)
        if entropy is not None:
            entropy = entropy.masked_fill(~(keep if squeeze else keep.any(-1)), 0.0)
    return logp, entropy


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """TRL's ``selective_log_softmax`` on rlfuse: ``log_softmax(logits / T)`` gathered at ``index``.

    Same signature and shapes as ``trl.trainer.utils.selective_log_softmax``: ``index`` is
    ``logits.shape[:-1]`` (one label per row) or ``(..., K)`` (K labels per row); rows where
    ``row_mask`` (shape of ``index``) is 0 return 0. Output dtype, as TRL on a GPU: float32 for
    one label per row (what TRL's Triton kernel returns), the logits' dtype for K labels per row
    (TRL's torch path, the only one it has for them); ``out_dtype`` overrides either
    (``logits.dtype`` is what TRL's CPU path returns; float32 is the more accurate). float64
    logits are computed exactly in float64. Gradients flow to ``logits``.
    """
    check_out_dtype(out_dtype)
    logp, _ = _logp_entropy(logits, index, temperature, row_mask, with_entropy=False)
    one_label = index.dim() == logits.dim() - 1
    return as_out_dtype(logp, torch.float32 if one_label else logits.dtype, out_dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """TRL's ``entropy_from_logits`` on rlfuse: entropy (nats) of ``softmax(logits)`` per row.

    ``chunk_size`` is accepted for signature compatibility and ignored: rlfuse's kernel never
    holds a float32 copy of the logits, whatever the row count. Output shape
    ``logits.shape[:-1]``; float32 as TRL's kernel path returns (``out_dtype`` overrides;
    float64 for float64 logits). Differentiable.
    """
    del chunk_size
    check_out_dtype(out_dtype)
    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _logp_entropy(logits, index, 1.0, None, with_entropy=True)
    return as_out_dtype(entropy, torch.float32, out_dtype)


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: Tensor | None = None, *,
                                      out_dtype: torch.dtype | None = None):
    """TRL's ``selective_log_softmax_and_entropy``: both outputs from ONE pass over the logits.

    Entropy is of ``softmax(logits / temperature)``; rows with ``row_mask == 0`` give 0 for
    both; ``entropy_requires_grad=False`` returns a detached entropy. Both float32, as TRL's
    kernel path returns (``out_dtype`` overrides; float64 for float64 logits).
    """
    check_out_dtype(out_dtype)
    logp, entropy = _logp_entropy(logits, index, temperature, row_mask, with_entropy=True)
    logp, entropy = (as_out_dtype(t, torch.float32, out_dtype) for t in (logp, entropy))
    return logp, (entropy if entropy_requires_grad else entropy.detach())


# --------------------------------------------------------------------------------------
# The fused LM head stand-in
# --------------------------------------------------------------------------------------

_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_RLFUSE_OUTPUTS = {"log_probs", "entropy", "mean_logits"}  # mean_logits: without softcap only
_stats: Counter = Counter()
_logger = logging.getLogger(__name__)
_told: set[str] = set()  # fallback reasons already logged (one line each per process)


def _fallback_reason(weight: Tensor, final_logit_softcapping, logit_scale, outputs) -> str | None:
    """Why a fused-head call cannot run on rlfuse exactly, or None when it can."""
    extra = [o for o in outputs if o in _OPTIONAL_OUTPUTS and o not in _RLFUSE_OUTPUTS]
    if extra:
        return (f"outputs {tuple(extra)} need the logits' maximum / sum of squared probabilities, "
                "which rlfuse's fused head does not compute (it returns log-probs, entropy and mean logits)")
    if final_logit_softcapping is not None and "mean_logits" in outputs:
        return "mean_logits of soft-capped logits needs a pass over the vocabulary, which rlfuse does not make"
    scale = float(logit_scale)
    if not (math.isfinite(scale) and scale != 0.0):
        return f"logit_scale {scale} (rlfuse takes a finite nonzero scale)"
    if hasattr(weight, "ds_id"):
        return "a DeepSpeed ZeRO-3 partitioned LM head (TRL re-gathers it in backward)"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"an LM-head weight of type {type(weight).__name__} (DTensor & co.)"
    return None


def _tell_once(reason: str) -> None:
    if reason not in _told:
        _told.add(reason)
        _logger.warning("rlfuse.integrations.trl: TRL's fused LM head falls back to TRL's own kernel: %s; "
                        "such calls run on TRL from now on (patch_stats()['fallback'] counts them)", reason)


def _mean_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """mean_v(scale * (h . w_v + b_v)) = scale * (h . mean_v(w_v) + mean_v(b_v)): exact, no
    [N, V] logits, the mean row of ``weight`` summed in float32 a block of rows at a time."""
    v = weight.shape[0]
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for s in range(0, v, 8192):
        total += weight[s:s + 8192].detach().float().sum(0)
    out = hidden.detach().float() @ (total / v)
    if bias is not None:
        out = out + bias.detach().float().mean()
    return out * scale


class RlfuseChunkedLogProb:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` where ``add_fused_lm_head`` calls it.

    ``apply`` keeps TRL's signature and return value (a 5-tuple ``log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1`` with ``None`` for what was not requested) and
    runs :func:`rlfuse.kernels.linear_logprobs`:

    * ``logit_scale``, ``final_logit_softcapping`` and ``temperature`` are applied in TRL's
      order (scale, soft-cap, divide by T);
    * ``mean_logits`` (KTO's, DPO's metrics) is exact without a vocabulary pass when there is
      no soft-cap: ``scale / T * (h . mean(W) + mean(b))``, not differentiable (as TRL's);
    * targets outside ``[0, V)`` (TRL's ``-100`` ignore label) are scored as token 0 and
      their outputs set to 0, as TRL's head does;
    * the LM-head matmul runs in the autocast dtype when autocast is on, else in the hidden
      states' dtype (TRL's ``compute_dtype`` rule);
    * TRL's ``chunk_size`` (its vocabulary tile width) is not used: rlfuse tiles over tokens
      and keeps O(chunk · V) extra memory.

    What rlfuse cannot reproduce exactly (``is_top1``, ``log_sum_sq_probs``, mean logits of
    soft-capped logits, ZeRO-3 or DTensor heads) is handed to TRL's own function unchanged,
    with one log line per reason, once.
    """

    _rlfuse_shim = True

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = _OPTIONAL_OUTPUTS):
        reason = _fallback_reason(weight, final_logit_softcapping, logit_scale, outputs)
        if reason is not None:
            _stats["fallback"] += 1
            _tell_once(reason)
            return _trl_chunked().apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)
        _stats["rlfuse"] += 1
        device = hidden.device
        compute_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                         else hidden.dtype)
        with torch.autocast(device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            valid = targets >= 0
            all_valid = bool(valid.all()) if targets.numel() else True
            labels = targets if all_valid else targets.masked_fill(~valid, 0)
            want_entropy = "entropy" in outputs
            out = _K.linear_logprobs(h, w, labels, bias=b, temperature=float(temperature),
                                     softcap=final_logit_softcapping, logit_scale=float(logit_scale),
                                     return_entropy=want_entropy)
            mean_logits = (_mean_logits(h, w, b, float(logit_scale) / float(temperature))
                           if "mean_logits" in outputs else None)
        logp, entropy = out if want_entropy else (out, None)
        if not all_valid:
            logp = torch.where(valid, logp, logp.new_zeros(()))
            if entropy is not None:
                entropy = torch.where(valid, entropy, entropy.new_zeros(()))
            if mean_logits is not None:
                mean_logits = torch.where(valid, mean_logits, mean_logits.new_zeros(()))
        return logp, entropy, None, mean_logits, None


# --------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------

# name in TRL modules -> (where TRL defines it, our replacement)
_TARGETS = {
    "_ChunkedLogProbFunction": RlfuseChunkedLogProb,
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
}
_REQUIRED = ("_ChunkedLogProbFunction", "selective_log_softmax", "entropy_from_logits", "add_fused_lm_head")
_CHUNKED_PARAMS = ["ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                   "final_logit_softcapping", "logit_scale", "outputs"]

_lock = threading.RLock()
_originals: dict[str, object] = {}       # name -> TRL's object
_records: list[tuple[object, str, object]] = []  # (module, name, TRL's object) we replaced
_active = False


def _trl_version() -> str:
    try:
        import trl
        return getattr(trl, "__version__", "unknown")
    except ImportError:
        return "not installed"


def _trl_chunked():
    original = _originals.get("_ChunkedLogProbFunction")
    if original is None:  # apply() called without patch(): use TRL's class directly
        original = importlib.import_module("trl.kernels").ChunkedLogProbFunction
    return original


def _load_trl():
    """TRL's utils module, checked to have every symbol the patch relies on."""
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except ImportError as exc:
        raise RuntimeError(f"rlfuse.integrations.trl.patch() needs TRL 1.x installed "
                           f"(import trl.trainer.utils failed: {exc})") from exc
    version = _trl_version()
    for name in _REQUIRED:
        if name not in vars(utils):
            raise RuntimeError(f"rlfuse.integrations.trl: installed TRL {version} does not fit the patch: "
                               f"trl.trainer.utils.{name} is missing (the patch targets TRL 1.x's "
                               "add_fused_lm_head path)")
    chunked = vars(utils)["_ChunkedLogProbFunction"]
    if getattr(chunked, "_rlfuse_shim", False):
        chunked = _originals.get("_ChunkedLogProbFunction", chunked)
    forward = getattr(chunked, "forward", None)
    if not hasattr(chunked, "apply") or forward is None:
        raise RuntimeError(f"rlfuse.integrations.trl: installed TRL {version} does not fit the patch: "
                           "trl.trainer.utils._ChunkedLogProbFunction has no apply/forward")
    params = list(inspect.signature(forward).parameters)
    if params[: len(_CHUNKED_PARAMS)] != _CHUNKED_PARAMS:
        raise RuntimeError(f"rlfuse.integrations.trl: installed TRL {version} does not fit the patch: "
                           f"trl.trainer.utils._ChunkedLogProbFunction.forward takes {params}, "
                           f"expected {_CHUNKED_PARAMS}")
    sls = vars(utils)["selective_log_softmax"]
    if not getattr(sls, "__module__", "").startswith("rlfuse"):
        sls_params = list(inspect.signature(sls).parameters)
        if sls_params[:2] != ["logits", "index"]:
            raise RuntimeError(f"rlfuse.integrations.trl: installed TRL {version} does not fit the patch: "
                               f"trl.trainer.utils.selective_log_softmax takes {sls_params}")
    return utils


def _trl_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def patch() -> None:
    """Route TRL's fused LM head and log-prob helpers through rlfuse. Idempotent.

    Raises RuntimeError naming the TRL version and the missing symbol when the installed TRL
    does not have what the patch replaces. Calling it again after importing more TRL
    modules patches those too.
    """
    global _active
    with _lock:
        utils = _load_trl()
        if not _originals:
            for name in _TARGETS:
                if name in vars(utils):
                    _originals[name] = vars(utils)[name]
        patched_ids = {(id(m), n) for m, n, _ in _records}
        for module in _trl_modules():
            namespace = vars(module)  # never getattr: TRL's lazy modules would import on access
            for name, replacement in _TARGETS.items():
                original = _originals.get(name)
                if original is None or namespace.get(name) is not original:
                    continue
                if (id(module), name) not in patched_ids:
                    _records.append((module, name, original))
                setattr(module, name, replacement)
        _active = True


def unpatch() -> None:
    """Put TRL's own objects back everywhere the patch (or a later import) put rlfuse's."""
    global _active
    with _lock:
        for module, name, original in reversed(_records):
            setattr(module, name, original)
        _records.clear()
        for module in _trl_modules():  # modules imported while patched took ours by import
            namespace = vars(module)
            for name, replacement in _TARGETS.items():
                if namespace.get(name) is replacement and name in _originals:
                    setattr(module, name, _originals[name])
        _active = False


def is_patched() -> bool:
    return _active


@contextlib.contextmanager
def patched():
    """``with patched(): ...`` runs the block on rlfuse; leaves the patch on if it was on before."""
    was_active = _active
    patch()
    try:
        yield
    finally:
        if not was_active:
            unpatch()


def patch_stats() -> dict[str, int]:
    """How many fused-head calls ran on rlfuse and how many fell back to TRL's kernel."""
    return {"rlfuse": _stats["rlfuse"], "fallback": _stats["fallback"]}
