"""Log-probability of the chosen token (and entropy) with an online softmax over vocab tiles.

One program per row walks the vocabulary in BLOCK_V tiles keeping three running scalars
(all relative to the running max m, so nothing overflows and nothing cancels):

    m  = max z                   (z = logits / temperature, float32)
    s  = sum e^(z - m)
    w  = sum e^(z - m) * (z - m)  (only with entropy)

When the max grows from m to m', the old sums are rescaled by alpha = e^(m - m'):
s' = alpha * s and w' = alpha * (w + (m - m') * s). At the end lse = m + log s,
logp = z_label - lse and entropy H = log s - w / s (= lse - sum p z, without the
cancellation of that form).

Backward recomputes p = e^(z - lse) tile by tile from the saved lse:

    d logp_y / dz = onehot(y) - p,      d H / dz = -p * (log p + H)

times dz/dx, stored in the logits dtype, optionally into the logits buffer itself
(the chunked fused LM head turns its logits buffer into the gradient in place).

z is the transformed logit x (``LogprobOptions``): z = x·(s/T) without a soft-cap, and
z = (c/T)·tanh(x·s/c) with one (HAS_CAP), so dz/dx = (s/T)·(1 - tanh²). -inf logits have
p = 0 and contribute 0 (not 0·inf) to the entropy and its gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..logprob_options import LogprobOptions
from . import interpreting, pick_configs

_FLT_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)  # running-max start: finite, no inf - inf


def _fwd_configs():
    gpu = [
        triton.Config({"BLOCK_V": 2048}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_V": 8192}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 8192}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_V": 16384}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_V": 16384}, num_warps=32, num_stages=1),
    ]
    return pick_configs(gpu, default=triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
                        interpreter=triton.Config({"BLOCK_V": 512}, num_warps=4, num_stages=1))


def _bwd_configs():
    gpu = [
        triton.Config({"BLOCK_V": 2048}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 8192}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 8192}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_V": 16384}, num_warps=16, num_stages=1),
    ]
    return pick_configs(gpu, default=triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
                        interpreter=triton.Config({"BLOCK_V": 512}, num_warps=4, num_stages=1))


def _prune_by_vocab(configs, named_args, **kwargs):
    """Drop tiles much wider than the vocabulary (keep the narrowest one at least)."""
    widest = max(triton.next_power_of_2(int(named_args["V"])), 2048)
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= widest]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_V"])]


@triton.autotune(configs=_fwd_configs(), key=["V", "WITH_ENTROPY", "HAS_CAP"],
                 prune_configs_by={"early_config_prune": _prune_by_vocab})
@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_row, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    V, load_scale, cap_t,
    WITH_ENTROPY: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), _FLT_LOWEST, tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = _transform(tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32),
                       load_scale, cap_t, HAS_CAP)
        z = tl.where(offs < V, z, float("-inf"))  # padding lanes: after the cap (tanh(-inf) = -1)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)  # 0 on padding lanes and on -inf logits
        if WITH_ENTROPY:
            shift = tl.where(s > 0, (m - m_new) * s, 0.0)
            zs = tl.where(p > 0, z - m_new, 0.0)  # not -inf where p == 0: 0 * -inf is NaN
            w = alpha * (w + shift) + tl.sum(p * zs, axis=0)
        s = alpha * s + tl.sum(p, axis=0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    label = tl.load(labels_ptr + row)
    z_label = _transform(tl.load(row_ptr + label).to(tl.float32), load_scale, cap_t, HAS_CAP)
    tl.store(logp_ptr + row, z_label - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, log_s - w / s)


@triton.jit
def _tanh(x):
    """tanh in float32 from exp (portable to the interpreter): an odd polynomial below
    |x| = 0.625 (Cephes tanhf), else 1 - 2 / (e^(2|x|) + 1); tanh(±inf) = ±1."""
    ax = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(ax, 44.0)) + 1.0)
    z = x * x
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * ax + ax
    r = tl.where(ax < 0.625, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _transform(x, load_scale, cap_t, HAS_CAP: tl.constexpr):
    """z from the float32 logits x: x·load_scale, then cap_t·tanh(·) when HAS_CAP."""
    u = x * load_scale
    if HAS_CAP:
        u = _tanh(u) * cap_t
    return u


def _scalars(opts: LogprobOptions):
    """(load_scale, cap_t, slope): u = x·load_scale; z = u, or cap_t·tanh(u) with a cap."""
    slope = opts.logit_scale / opts.temperature
    if opts.softcap is None:
        return slope, 1.0, slope
    return opts.logit_scale / opts.softcap, opts.softcap / opts.temperature, slope


@triton.jit
def _bf16_round_nearest_even(x):
    """float32 -> bfloat16 rounding to nearest even, by integer ops. Used only under the
    interpreter, whose plain cast truncates (a GPU's cvt.rn.bf16.f32 rounds to nearest)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.autotune(configs=_bwd_configs(), key=["V", "HAS_ENTROPY", "HAS_CAP"], restore_value=["out_ptr"],
                 prune_configs_by={"early_config_prune": _prune_by_vocab})
@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_row, out_ptr, stride_out, labels_ptr, lse_ptr, ent_ptr,
    grad_logp_ptr, grad_ent_ptr,
    V, load_scale, cap_t, slope,
    HAS_ENTROPY: tl.constexpr, HAS_CAP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    if HAS_ENTROPY:
        g_ent = tl.load(grad_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        # each element is read, then overwritten, by this program only: safe in place
        u = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32) * load_scale
        if HAS_CAP:
            th = _tanh(u)
            z = th * cap_t
            dz_dx = slope * (1.0 - th * th)
        else:
            z = u
            dz_dx = slope
        log_p = z - lse
        p = tl.exp(log_p)
        g = tl.where(offs == label, g_logp, 0.0) - g_logp * p
        if HAS_ENTROPY:
            log_p_safe = tl.where(p > 0, log_p, 0.0)  # -inf logits: p * (.) = 0, not 0 * -inf
            g -= g_ent * p * (log_p_safe + ent)
        g = g * dz_dx
        if ROUND_BF16:
            tl.store(out_row + offs, _bf16_round_nearest_even(g), mask=valid)
        else:
            tl.store(out_row + offs, g.to(out_ptr.dtype.element_ty), mask=valid)


def logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, opts, with_entropy: bool):
    """logits [N, V] (last dim contiguous, any row stride) -> (logp, lse, entropy | empty(0))."""
    opts = LogprobOptions.of(opts)
    n, v = logits.shape
    assert logits.stride(-1) == 1 or v == 1, "vocab dimension must be contiguous"
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    if n == 0:
        return logp, lse, entropy
    labels = labels.to(torch.int64).contiguous()
    _logprobs_fwd_kernel[(n,)](
        logits, logits.stride(0), labels, logp, lse, entropy if with_entropy else logp,
        v, *_scalars(opts)[:2], WITH_ENTROPY=bool(with_entropy), HAS_CAP=opts.softcap is not None,
    )
    return logp, lse, entropy


def logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                      entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                      grad_entropy: torch.Tensor | None, opts, inplace: bool,
                      out: torch.Tensor | None = None):
    """Gradient wrt ``logits`` (its shape and dtype), written into ``logits`` when ``inplace``,
    else into ``out`` when given."""
    opts = LogprobOptions.of(opts)
    n, v = logits.shape
    assert logits.stride(-1) == 1 or v == 1, "vocab dimension must be contiguous"
    if inplace:
        out = logits
    elif out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    has_ent = grad_entropy is not None
    if has_ent and (entropy is None or entropy.numel() != n):
        raise ValueError("grad_entropy given but the forward did not compute the entropy")
    labels = labels.to(torch.int64).contiguous()
    lse = lse.float().contiguous()
    grad_logp = grad_logp.float().contiguous()
    if has_ent:
        entropy = entropy.float().contiguous()
        grad_entropy = grad_entropy.float().contiguous()
    _logprobs_bwd_kernel[(n,)](
        logits, logits.stride(0), out, out.stride(0), labels, lse,
        entropy if has_ent else lse, grad_logp, grad_entropy if has_ent else grad_logp,
        v, *_scalars(opts), HAS_ENTROPY=has_ent, HAS_CAP=opts.softcap is not None,
        ROUND_BF16=interpreting() and out.dtype == torch.bfloat16,
    )
    return out
