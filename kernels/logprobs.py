"""Log-probability of chosen tokens (and entropy) from logits, without a float32
[N, V] log-softmax in memory.

The op is a torch.library custom op with a fake implementation and an autograd formula,
so it runs inside torch.compile graphs without breaks; the work is done by the backend
picked in ``dispatch``. Its options (temperature, softcap, logit_scale) travel as one
``LogprobOptions``, validated here and flattened to scalars only at the custom-op boundary.
On CPU the backward writes into recycled memory (``_GradientRecycler``): a fresh [N, V]
gradient costs more in page faults than the kernel itself.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

from . import _validate, dispatch
from .logprob_options import LogprobOptions


def _row_blocks(x: Tensor):
    """2-D views [rows, V] that cover all leading positions of ``x`` in order, without copying.

    ``logits[:, :-1]`` cannot be flattened to one 2-D view, so it is walked slab by slab.
    """
    if x.dim() == 2:
        return [x]
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        return [block for sub in x.unbind(0) for block in _row_blocks(sub)]


@torch.library.custom_op("rlfuse::logprobs", mutates_args=())
def _logprobs_op(logits: Tensor, labels: Tensor, temperature: float, softcap: float | None,
                 logit_scale: float, with_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _validate.label_range(labels, logits.shape[-1])
    impl = dispatch.get(backend)
    opts = LogprobOptions(temperature, softcap, logit_scale)
    lead = logits.shape[:-1]
    flat_labels = labels.reshape(-1)
    outs, start = [], 0
    for block in _row_blocks(logits):
        stop = start + block.shape[0]
        outs.append(impl.logprobs_forward(block, flat_labels[start:stop], opts, with_entropy))
        start = stop
    logp, lse, ent = (torch.cat(parts) if len(outs) > 1 else parts[0] for parts in zip(*outs))
    ent = ent.reshape(lead) if with_entropy else ent
    return logp.reshape(lead), lse.reshape(lead), ent


@_logprobs_op.register_fake
def _(logits, labels, temperature, softcap, logit_scale, with_entropy, backend):
    lead = logits.shape[:-1]
    f32 = dict(dtype=torch.float32, device=logits.device)
    ent = logits.new_empty(lead, **f32) if with_entropy else logits.new_empty(0, **f32)
    return logits.new_empty(lead, **f32), logits.new_empty(lead, **f32), ent


class _GradientRecycler:
    """Hands out the memory of the last [N, V] logits gradient again once nobody holds it.

    Why: a fresh multi-hundred-MB CPU tensor is fresh mmap'd memory, and the kernel's
    first-touch page faults (plus their zero-fill) cost several times the backward's own
    memory traffic (measured: 2.4 GB/s vs 19 GB/s for a copy; benchmarks/roofline_logprobs.py).
    Training loops drop the gradient every step (``zero_grad(set_to_none=True)``), so the
    storage is free again by the next backward: we keep one reference to it and reuse it when
    ours is the only one left. Costs at most one gradient's memory while no step runs;
    RLFUSE_RECYCLE_GRADIENTS=0 turns it off.
    """

    MIN_BYTES = 8 << 20  # below this, malloc's own free lists already reuse touched memory

    def __init__(self):
        self._storage = None
        self._lock = threading.Lock()

    def empty(self, shape, dtype, device) -> Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if (device.type != "cpu" or nbytes < self.MIN_BYTES
                or os.environ.get("RLFUSE_RECYCLE_GRADIENTS", "1") == "0"):
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            st = self._storage
            if st is not None and st.nbytes() == nbytes and torch._C._storage_Use_Count(st._cdata) == 1:
                out = torch.empty(0, dtype=dtype, device=device)
                return out.set_(st, 0, shape)
            out = torch.empty(shape, dtype=dtype, device=device)
            self._storage = out.untyped_storage()
            return out


_recycler = _GradientRecycler()


@torch.library.custom_op("rlfuse::logprobs_backward", mutates_args=())
def _logprobs_backward_op(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
                          grad_logp: Tensor, grad_entropy: Tensor | None, temperature: float,
                          softcap: float | None, logit_scale: float, backend: str) -> Tensor:
    impl = dispatch.get(backend)
    opts = LogprobOptions(temperature, softcap, logit_scale)
    flat = [t.reshape(-1) if t is not None and t.numel() else t
            for t in (labels, lse, entropy, grad_logp.float().contiguous(),
                      None if grad_entropy is None else grad_entropy.float().contiguous())]
    labels_f, lse_f, ent_f, glp_f, gent_f = flat
    grad = _recycler.empty(logits.shape, logits.dtype, logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])
    start = 0
    for block in _row_blocks(logits):
        stop = start + block.shape[0]
        sl = slice(start, stop)
        ent_b = ent_f[sl] if ent_f is not None and ent_f.numel() else ent_f
        dst = grad_rows[sl]
        got = impl.logprobs_backward(block, labels_f[sl], lse_f[sl], ent_b, glp_f[sl],
                                     None if gent_f is None else gent_f[sl], opts, False, out=dst)
        if got.data_ptr() != dst.data_ptr():  # a backend that could not write into ``out`` (dtype)
            dst.copy_(got)
        start = stop
    return grad


@_logprobs_backward_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, logit_scale, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, softcap, logit_scale, with_entropy, backend = inputs
    _logp, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (temperature, softcap, logit_scale)
    ctx.with_entropy, ctx.backend = with_entropy, backend


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    grad = _logprobs_backward_op(logits, labels, lse, entropy, grad_logp, grad_entropy,
                                 *ctx.args, ctx.backend)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("rlfuse::logprobs", _backward, setup_context=_setup_context)


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False, softcap: float | None = None,
                         logit_scale: float | None = None):
    """log softmax(z)[labels] as float32, where z = softcap·tanh(logits·logit_scale / softcap)
    / temperature (see ``LogprobOptions``).

    Args:
        logits: [..., V] float tensor (fp32/bf16/fp16/fp64); may be a strided view such as
            ``logits[:, :-1]`` as long as the vocabulary dimension is contiguous. -inf entries
            (masked vocabulary) are allowed: they have probability 0 and add 0 to the entropy.
        labels: integer tensor of shape ``logits.shape[:-1]``, values in [0, V).
        temperature: divides the logits before the softmax (> 0).
        return_entropy: also return the entropy of softmax(z).
        softcap: Gemma-2/3 final-logit soft-capping value (None: no capping).
        logit_scale: multiplies the logits first (Cohere ``logit_scale``; 1/``logits_scaling``
            for Granite). None means 1.

    Returns:
        ``logp`` of shape ``labels.shape`` (float32), or ``(logp, entropy)``.
        Gradients flow to ``logits``.
    """
    _validate.floating("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    _validate.integer_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    _validate.same_device(logits=logits, labels=labels)
    opts = LogprobOptions.create(temperature, softcap, logit_scale)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if logits.dim() == 1:  # a single position
        out = logprobs_from_logits(logits[None], labels[None], temperature=temperature,
                                   return_entropy=return_entropy, softcap=softcap,
                                   logit_scale=logit_scale)
        return tuple(o[0] for o in out) if return_entropy else out[0]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    backend = dispatch.resolve(logits.device, "logprobs_forward")
    logp, _lse, entropy = _logprobs_op(logits, labels.long(), *opts.as_args(),
                                       bool(return_entropy), backend)
    return (logp, entropy) if return_entropy else logp
