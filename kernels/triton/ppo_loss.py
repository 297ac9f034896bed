"""Fused PPO loss: one pass computes the per-token gradients of the token-mean loss and
per-program partial sums of the 7 stats; a one-program kernel reduces the partials in a
fixed order. No atomics, so the loss and stats are bitwise reproducible for a given config.

    count = sum(mask)                              (computed first, read from device memory)
    pass 1: program k owns tokens [k*CHUNK, (k+1)*CHUNK), walks them in BLOCK_N tiles,
            writes grad_logp / grad_entropy / grad_values (already * mask / count) and
            partials[k, 0:7] = sum over its tokens of mask * (loss, pg, vf, kl, ent, clip, akl)
    pass 2: stats = (sum_k partials[k]) / max(count, 1); loss = stats[0]

CHUNK is fixed (independent of the autotuned BLOCK_N), so the partials buffer has a size
known before launch. Masked positions contribute exactly 0 (``where``, not ``* mask``), so
garbage in padding (say an overflowing ratio) cannot turn the loss into NaN.

Per token (A = advantage, r = exp(logp - old_logp)):
    pg = max(-A r, -A clip(r, 1-eps_lo, 1+eps_hi)),  d pg/d logp = -A r if the unclipped
    term is taken (ties go to it) else 0; dual clip: pg = -A*dual where A < 0 and pg above
    it (gradient 0 there); KL k1 = d, k2 = d^2/2, k3 = e^-d + d - 1 (d = logp - ref_logp),
    k1+/k3+ the value of k1/k3 with the gradient d of k2;
    value 0.5 * max((v-R)^2, (v_clip-R)^2), v_clip = old_v + clip(v - old_v, +-value_clip);
    log_ratio_clamp: logp - old_logp clamped before the exp, the ratio's gradient 0 there.

Token weights: token i weighs w[i] * w_scale in the loss and in its gradients, with w = the mask
and w_scale = 1/count (token mean) or w = the op's per-token loss weight and w_scale = 1 (the
other loss aggregations, see kernels/ppo_loss.py). The other stats are always token means.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pick_configs
from ..backends import STATS_FIELDS
from ..ppo_options import KL_CODES

CHUNK = 4096          # tokens per program (a multiple of every BLOCK_N below)
_NSTAT = len(STATS_FIELDS)
_STAT_COLS = 8        # partials row width (power of two; column 7 is unused)
_KL_VALUE = {"k1+": "k1", "k3+": "k3"}  # straight-through: value code; the gradient is k2's


def _configs():
    gpu = [
        triton.Config({"BLOCK_N": 512}, num_warps=2, num_stages=2),
        triton.Config({"BLOCK_N": 1024}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 2048}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 2048}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_N": 4096}, num_warps=8, num_stages=1),
    ]
    return pick_configs(gpu, default=triton.Config({"BLOCK_N": 1024}, num_warps=4, num_stages=2),
                        interpreter=triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=1))


@triton.autotune(configs=_configs(), key=["N_BUCKET", "HAS_REF", "HAS_ENT", "HAS_VAL"])
@triton.jit
def _ppo_loss_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, val_ptr, old_val_ptr, ret_ptr, w_ptr,
    count_ptr, g_logp_ptr, g_ent_ptr, g_val_ptr, partial_ptr,
    N, N_BUCKET, clip_lo, clip_hi, dual_clip, kl_coef, ent_coef, value_clip, value_coef, kl_max,
    lr_max,
    CHUNK_N: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr, KL_ST: tl.constexpr,
    KL_CLAMP: tl.constexpr, LR_CLAMP: tl.constexpr,
    WEIGHTED: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_VAL: tl.constexpr, VALUE_CLIP: tl.constexpr, DUAL_CLIP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    inv = 1.0 / tl.maximum(tl.load(count_ptr), 1.0)
    w_scale = 1.0 if WEIGHTED else inv
    cols = tl.arange(0, BLOCK_N)
    acc_loss = tl.zeros((BLOCK_N,), tl.float32)
    acc_pg = tl.zeros((BLOCK_N,), tl.float32)
    acc_vf = tl.zeros((BLOCK_N,), tl.float32)
    acc_kl = tl.zeros((BLOCK_N,), tl.float32)
    acc_ent = tl.zeros((BLOCK_N,), tl.float32)
    acc_clip = tl.zeros((BLOCK_N,), tl.float32)
    acc_akl = tl.zeros((BLOCK_N,), tl.float32)
    chunk_start = pid.to(tl.int64) * CHUNK_N
    for off in range(0, CHUNK_N, BLOCK_N):
        idx = chunk_start + off + cols
        inb = (idx < N) & (off + cols < CHUNK_N)  # BLOCK_N may exceed a (test-sized) CHUNK
        m = tl.load(mask_ptr + idx, mask=inb, other=0.0)
        on = m != 0.0
        if WEIGHTED:
            w = tl.load(w_ptr + idx, mask=inb, other=0.0)
        else:
            w = m
        ws = w * w_scale
        logp = tl.load(logp_ptr + idx, mask=inb, other=0.0)
        old = tl.load(old_ptr + idx, mask=inb, other=0.0)
        a = tl.load(adv_ptr + idx, mask=inb, other=0.0)

        log_ratio = logp - old
        if LR_CLAMP:  # clamped log-ratio, the ratio's gradient 0 where clamped
            ratio_stops = (log_ratio > lr_max) | (log_ratio < -lr_max)
            log_ratio = tl.minimum(tl.maximum(log_ratio, -lr_max), lr_max)
        ratio = tl.exp(log_ratio)
        unclipped = -a * ratio
        clipped = -a * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        take_unclipped = unclipped >= clipped
        pg = tl.where(take_unclipped, unclipped, clipped)
        g = tl.where(take_unclipped, unclipped, 0.0)
        if LR_CLAMP:
            g = tl.where(ratio_stops, 0.0, g)
        if DUAL_CLIP:
            cap = -a * dual_clip
            capped = (a < 0.0) & (pg > cap)
            pg = tl.where(capped, cap, pg)
            g = tl.where(capped, 0.0, g)
        total = pg
        kl = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_REF:
            d = logp - tl.load(ref_ptr + idx, mask=inb, other=0.0)
            if KL_EST == 1:
                kl = d
                dk = tl.full((BLOCK_N,), 1.0, tl.float32)
            elif KL_EST == 2:
                kl = 0.5 * d * d
                dk = d
            else:
                e = tl.exp(-d)
                kl = e + d - 1.0
                dk = 1.0 - e
            if KL_ST:
                dk = d
            if KL_CLAMP:  # clamped value, gradient 0 where clamped
                outside = (kl > kl_max) | (kl < -kl_max)
                kl = tl.minimum(tl.maximum(kl, -kl_max), kl_max)
                dk = tl.where(outside, 0.0, dk)
            g += kl_coef * dk
            total += kl_coef * kl
        ent = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_ENT:
            ent = tl.load(ent_ptr + idx, mask=inb, other=0.0)
            total -= ent_coef * ent
            tl.store(g_ent_ptr + idx, tl.where(on, -ent_coef * ws, 0.0), mask=inb)
        vf = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_VAL:
            v = tl.load(val_ptr + idx, mask=inb, other=0.0)
            ret = tl.load(ret_ptr + idx, mask=inb, other=0.0)
            err = v - ret
            vf = err * err
            d_vf = err
            if VALUE_CLIP:
                old_v = tl.load(old_val_ptr + idx, mask=inb, other=0.0)
                delta = v - old_v
                err_c = old_v + tl.minimum(tl.maximum(delta, -value_clip), value_clip) - ret
                vf_c = err_c * err_c
                use_unclipped = vf >= vf_c
                inside = tl.abs(delta) < value_clip
                vf = tl.where(use_unclipped, vf, vf_c)
                d_vf = tl.where(use_unclipped, err, tl.where(inside, err_c, 0.0))
            vf = 0.5 * vf
            total += value_coef * vf
            tl.store(g_val_ptr + idx, tl.where(on, value_coef * d_vf * ws, 0.0), mask=inb)
        tl.store(g_logp_ptr + idx, tl.where(on, g * ws, 0.0), mask=inb)

        approx_kl = ratio - 1.0 - log_ratio
        is_clipped = tl.where(clipped > unclipped, 1.0, 0.0)
        acc_loss += tl.where(on, total * w, 0.0)
        acc_pg += tl.where(on, pg * m, 0.0)
        acc_vf += tl.where(on, vf * m, 0.0)
        acc_kl += tl.where(on, kl * m, 0.0)
        acc_ent += tl.where(on, ent * m, 0.0)
        acc_clip += tl.where(on, is_clipped * m, 0.0)
        acc_akl += tl.where(on, approx_kl * m, 0.0)

    row = partial_ptr + pid.to(tl.int64) * 8
    tl.store(row + 0, tl.sum(acc_loss, axis=0))
    tl.store(row + 1, tl.sum(acc_pg, axis=0))
    tl.store(row + 2, tl.sum(acc_vf, axis=0))
    tl.store(row + 3, tl.sum(acc_kl, axis=0))
    tl.store(row + 4, tl.sum(acc_ent, axis=0))
    tl.store(row + 5, tl.sum(acc_clip, axis=0))
    tl.store(row + 6, tl.sum(acc_akl, axis=0))
    tl.store(row + 7, 0.0)


@triton.jit
def _ppo_finalize_kernel(partial_ptr, count_ptr, stats_ptr, loss_ptr, P,
                         NSTAT: tl.constexpr, BLOCK_P: tl.constexpr, WEIGHTED: tl.constexpr):
    """Sum the [P, 8] partials in a fixed order (one program) and divide by the count (the
    weighted loss, column 0, is already a sum of weights * losses)."""
    rows = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_P, 8), tl.float32)
    for start in range(0, P, BLOCK_P):
        r = start + rows
        acc += tl.load(partial_ptr + r[:, None] * 8 + cols[None, :], mask=(r < P)[:, None], other=0.0)
    inv = 1.0 / tl.maximum(tl.load(count_ptr), 1.0)
    sums = tl.sum(acc, axis=0)
    stats = sums * inv
    if WEIGHTED:
        stats = tl.where(cols == 0, sums, stats)
    tl.store(stats_ptr + cols, stats, mask=cols < NSTAT)
    tl.store(loss_ptr, tl.sum(tl.where(cols == 0, stats, 0.0), axis=0))


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                     returns, loss_weight, opts):
    """See ``kernels/backends/__init__.py``: (loss, stats[7], grad_logp, grad_entropy | empty,
    grad_values | empty); all inputs 1-D contiguous float32 (optional ones None)."""
    def f32(t):
        return None if t is None else t.float().contiguous()

    logp, old_logp, advantages, mask = f32(logp), f32(old_logp), f32(advantages), f32(mask)
    ref_logp, entropy, values, old_values, returns, loss_weight = map(
        f32, (ref_logp, entropy, values, old_values, returns, loss_weight))
    n = logp.numel()
    dev = logp.device
    has_ref, has_ent, has_val = ref_logp is not None, entropy is not None, values is not None
    if has_val and returns is None:
        raise ValueError("values given without returns")
    value_clipped = has_val and opts.value_clip is not None and old_values is not None
    weighted = loss_weight is not None

    g_logp = torch.empty(n, dtype=torch.float32, device=dev)
    g_ent = torch.empty(n if has_ent else 0, dtype=torch.float32, device=dev)
    g_val = torch.empty(n if has_val else 0, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(_NSTAT, dtype=torch.float32, device=dev)
    if n == 0:
        return loss.zero_(), stats.zero_(), g_logp, g_ent, g_val

    count = mask.sum()  # exact: integer-valued partial sums below 2**24 tokens
    programs = triton.cdiv(n, CHUNK)
    partials = torch.empty(programs, _STAT_COLS, dtype=torch.float32, device=dev)
    dummy = logp
    _ppo_loss_kernel[(programs,)](
        logp, old_logp, advantages, mask,
        ref_logp if has_ref else dummy, entropy if has_ent else dummy,
        values if has_val else dummy, old_values if value_clipped else dummy,
        returns if has_val else dummy, loss_weight if weighted else dummy,
        count, g_logp, g_ent if has_ent else dummy, g_val if has_val else dummy, partials,
        n, triton.next_power_of_2(n), 1.0 - opts.clip_eps, 1.0 + opts.clip_high,
        opts.dual_clip if opts.dual_clip is not None else 0.0, opts.kl_coef, opts.entropy_coef,
        opts.value_clip if value_clipped else 0.0, opts.value_coef,
        opts.kl_clamp if opts.kl_clamp is not None else 0.0,
        opts.log_ratio_clamp if opts.log_ratio_clamp is not None else 0.0,
        CHUNK_N=CHUNK, HAS_REF=has_ref, KL_CLAMP=opts.kl_clamp is not None,
        LR_CLAMP=opts.log_ratio_clamp is not None,
        KL_EST=KL_CODES[_KL_VALUE.get(opts.kl_estimator, opts.kl_estimator)],
        KL_ST=opts.kl_estimator in _KL_VALUE, WEIGHTED=weighted, HAS_ENT=has_ent,
        HAS_VAL=has_val, VALUE_CLIP=value_clipped, DUAL_CLIP=opts.dual_clip is not None,
    )
    _ppo_finalize_kernel[(1,)](partials, count, stats, loss, programs, NSTAT=_NSTAT,
                               BLOCK_P=min(1024, max(16, triton.next_power_of_2(programs))),
                               WEIGHTED=weighted)
    return loss, stats, g_logp, g_ent, g_val
