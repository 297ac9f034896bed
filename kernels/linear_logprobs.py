"""The fused LM head: log-probs (and entropy) of chosen tokens from hidden states and the
output-embedding matrix, without ever holding the [tokens, vocab] logits.

Tokens are processed in chunks: each chunk's logits are computed into one reused buffer,
reduced by the backend's row kernel to (logp, lse, entropy), and dropped. Backward
recomputes a chunk's logits, turns them into their gradient in place, and feeds two
matmuls (grad_hidden, grad_weight). Peak extra memory is O(chunk · V), never O(N · V).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, dispatch
from .logprob_options import LogprobOptions

# Logit elements per chunk: small on CPU (cache, memory), larger on a GPU (fills the matmul).
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, 1 << 24)
    rows = max(1, budget // max(vocab, 1))
    if rows >= 16:
        rows = rows // 16 * 16  # whole matmul tiles
    return max(1, min(n_tokens, rows))


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


@torch.library.custom_op("rlfuse::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                        temperature: float, softcap: float | None, logit_scale: float,
                        with_entropy: bool, chunk_size: int,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _validate.label_range(labels, weight.shape[0])
    impl = dispatch.get(backend)
    opts = LogprobOptions(temperature, softcap, logit_scale)
    n, v = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    buf = torch.empty(min(chunk_size, n), v, dtype=hidden.dtype, device=hidden.device)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        logits = _chunk_logits(hidden[s:e], weight, bias, buf[: e - s])
        lp, ls, ent = impl.logprobs_forward(logits, labels[s:e], opts, with_entropy)
        logp[s:e], lse[s:e] = lp, ls
        if with_entropy:
            entropy[s:e] = ent
    return logp, lse, entropy


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, logit_scale, with_entropy, chunk_size, backend):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), hidden.new_empty(n if with_entropy else 0, **f32)


@torch.library.custom_op("rlfuse::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                                 lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                                 grad_entropy: Tensor | None, temperature: float,
                                 softcap: float | None, logit_scale: float, chunk_size: int,
                                 backend: str, weight_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    impl = dispatch.get(backend)
    opts = LogprobOptions(temperature, softcap, logit_scale)
    n, v = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    # float32 accumulation across chunks when the weight is float32; low-precision weights
    # accumulate in their own dtype so the gradient costs no more than the weight itself.
    # A frozen head (LoRA training: weight_grad=False) gets an empty one and no dW matmul,
    # a third of the backward's FLOPs.
    grad_weight = torch.zeros_like(weight) if weight_grad else weight.new_empty(0)
    grad_bias = torch.zeros(v if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    grad_logp = grad_logp.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    buf = torch.empty(min(chunk_size, n), v, dtype=hidden.dtype, device=hidden.device)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        logits = _chunk_logits(hidden[s:e], weight, bias, buf[: e - s])
        g = impl.logprobs_backward(logits, labels[s:e], lse[s:e],
                                   entropy[s:e] if entropy.numel() else entropy, grad_logp[s:e],
                                   None if grad_entropy is None else grad_entropy[s:e],
                                   opts, True)
        torch.mm(g, weight, out=grad_hidden[s:e])
        if weight_grad:
            grad_weight.addmm_(g.t(), hidden[s:e])
        if bias is not None:
            grad_bias += g.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if bias is not None else grad_bias


@_linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, logit_scale,
      chunk_size, backend, weight_grad=True):
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return torch.empty_like(hidden), torch.empty_like(weight) if weight_grad else weight.new_empty(0), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, logit_scale, with_entropy, chunk_size, backend = inputs
    _logp, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (temperature, softcap, logit_scale, with_entropy, chunk_size, backend)


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, softcap, logit_scale, with_entropy, chunk_size, backend = ctx.args
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    weight_grad = ctx.needs_input_grad[1]
    gh, gw, gb = _linear_logprobs_backward_op(hidden, weight, bias, labels, lse, entropy, grad_logp,
                                              grad_entropy if with_entropy else None, temperature,
                                              softcap, logit_scale, chunk_size, backend, weight_grad)
    return (gh, gw if weight_grad else None, (gb if bias is not None else None),
            None, None, None, None, None, None, None)


torch.library.register_autograd("rlfuse::linear_logprobs", _backward, setup_context=_setup_context)


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False,
                    chunk_size: int | None = None, softcap: float | None = None,
                    logit_scale: float | None = None):
    """log softmax(z) at ``labels``, z = the logits hidden @ weight.T + bias transformed by
    ``LogprobOptions`` (logit_scale, softcap, temperature), never materialising the
    [tokens, vocab] logits in forward or backward.

    Args:
        hidden: [..., H] last hidden states (fp32/bf16/fp16).
        weight: [V, H] LM-head (output embedding) matrix, same dtype as ``hidden``.
        labels: integer tensor of shape ``hidden.shape[:-1]`` with values in [0, V).
        bias: optional [V] LM-head bias.
        temperature: divides the logits before the softmax (> 0).
        return_entropy: also return the entropy of the softmax.
        softcap: Gemma-2/3 final-logit soft-cap (logits = c·tanh(logits / c)); None: none.
        logit_scale: multiplies the logits first (Cohere; 1/logits_scaling for Granite).
        chunk_size: tokens per chunk (default: sized so a chunk's logits stay ~16 MB (fp32) on CPU,
            ~128 MB on a GPU).

    Returns:
        float32 ``logp`` of shape ``labels.shape``, or ``(logp, entropy)``. Gradients flow to
        ``hidden``, ``weight`` and ``bias``.
    """
    _validate.floating("hidden", hidden)
    _validate.floating("weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight shape "
                         f"{tuple(weight.shape)} (expected [V, {hidden.shape[-1]}])")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        _validate.floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match vocab size {weight.shape[0]}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype")
    _validate.integer_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    _validate.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    opts = LogprobOptions.create(temperature, softcap, logit_scale)
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n, weight.shape[0], hidden.device)
    backend = dispatch.resolve(hidden.device, "logprobs_forward")
    logp, _lse, entropy = _linear_logprobs_op(h2, weight, bias, labels.reshape(-1).long(),
                                              *opts.as_args(), bool(return_entropy),
                                              max(1, min(chunk, max(n, 1))), backend)
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp
