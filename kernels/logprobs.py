"""Log-probability of chosen tokens (and entropy) from logits, without a float32
[N, V] log-softmax in memory.

The op is a torch.library custom op with a fake implementation and an autograd formula,
so it runs inside torch.compile graphs without breaks; the work is done by the backend
picked in ``dispatch``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, dispatch


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
def _logprobs_op(logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _validate.label_range(labels, logits.shape[-1])
    impl = dispatch.get(backend)
    lead = logits.shape[:-1]
    flat_labels = labels.reshape(-1)
    outs, start = [], 0
    for block in _row_blocks(logits):
        stop = start + block.shape[0]
        outs.append(impl.logprobs_forward(block, flat_labels[start:stop], temperature, with_entropy))
        start = stop
    logp, lse, ent = (torch.cat(parts) if len(outs) > 1 else parts[0] for parts in zip(*outs))
    ent = ent.reshape(lead) if with_entropy else ent
    return logp.reshape(lead), lse.reshape(lead), ent


@_logprobs_op.register_fake
def _(logits, labels, temperature, with_entropy, backend):
    lead = logits.shape[:-1]
    f32 = dict(dtype=torch.float32, device=logits.device)
    ent = logits.new_empty(lead, **f32) if with_entropy else logits.new_empty(0, **f32)
    return logits.new_empty(lead, **f32), logits.new_empty(lead, **f32), ent


@torch.library.custom_op("rlfuse::logprobs_backward", mutates_args=())
def _logprobs_backward_op(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
                          grad_logp: Tensor, grad_entropy: Tensor | None, temperature: float,
                          backend: str) -> Tensor:
    impl = dispatch.get(backend)
    flat = [t.reshape(-1) if t is not None and t.numel() else t
            for t in (labels, lse, entropy, grad_logp.float().contiguous(),
                      None if grad_entropy is None else grad_entropy.float().contiguous())]
    labels_f, lse_f, ent_f, glp_f, gent_f = flat
    blocks = _row_blocks(logits)
    if len(blocks) == 1:  # one [N, V] view: the backend's fresh gradient is the result (no copy)
        g = impl.logprobs_backward(blocks[0], labels_f, lse_f, ent_f, glp_f, gent_f, temperature, False)
        return g.reshape(logits.shape)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])
    start = 0
    for block in blocks:
        stop = start + block.shape[0]
        sl = slice(start, stop)
        ent_b = ent_f[sl] if ent_f is not None and ent_f.numel() else ent_f
        grad_rows[sl].copy_(impl.logprobs_backward(block, labels_f[sl], lse_f[sl], ent_b, glp_f[sl],
                                         None if gent_f is None else gent_f[sl], temperature, False))
        start = stop
    return grad


@_logprobs_backward_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, with_entropy, backend = inputs
    _logp, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.with_entropy, ctx.backend = temperature, with_entropy, backend


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    grad = _logprobs_backward_op(logits, labels, lse, entropy, grad_logp, grad_entropy,
                                 ctx.temperature, ctx.backend)
    return grad, None, None, None, None


torch.library.register_autograd("rlfuse::logprobs", _backward, setup_context=_setup_context)


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log softmax(logits / temperature) at ``labels``, as float32.

    Args:
        logits: [..., V] float tensor (fp32/bf16/fp16/fp64); may be a strided view such as
            ``logits[:, :-1]`` as long as the vocabulary dimension is contiguous.
        labels: integer tensor of shape ``logits.shape[:-1]``, values in [0, V).
        temperature: divides the logits before the softmax (> 0).
        return_entropy: also return the entropy of softmax(logits / temperature).

    Returns:
        ``logp`` of shape ``labels.shape`` (float32), or ``(logp, entropy)``.
        Gradients flow to ``logits``.
    """
    _validate.floating("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    _validate.integer_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    _validate.same_device(logits=logits, labels=labels)
    _validate.positive("temperature", temperature)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if logits.dim() == 1:  # a single position
        out = logprobs_from_logits(logits[None], labels[None], temperature=temperature,
                                   return_entropy=return_entropy)
        return tuple(o[0] for o in out) if return_entropy else out[0]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    backend = dispatch.resolve(logits.device, "logprobs_forward")
    logp, _lse, entropy = _logprobs_op(logits, labels.long(), float(temperature),
                                       bool(return_entropy), backend)
    return (logp, entropy) if return_entropy else logp
