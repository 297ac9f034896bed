"""Generalised advantage estimation as a reverse associative scan, one program per row.

Over the valid positions of a row, with n(t) the next valid position after t,

    a_t = r_t - V_t + gamma * V_n(t) + gamma*lam * a_n(t)       (a, V after the last: 0)

Carry the pair (a, V) of the next valid position: position t is the affine map

    valid : (a, v) -> (c*a + gamma*v + (r_t - V_t),  V_t)        c = gamma*lam
    masked: (a, v) -> (a, v)                                     (skipped: identity)

Every such map, and every composition of them, has the form
(a, v) -> (p*a + q*v + x, s*v + y), so a 5-tuple (p, q, x, s, y) describes it and
composition is an associative (not commutative) combine. The state at t is the
composition f_t o f_t+1 o ... applied to (0, 0): a reverse inclusive scan.

The row is walked from its end in BLOCK_T tiles. Each tile is loaded back to front
(scan index j <-> time T-1-j) and scanned forwards: ``tl.associative_scan(reverse=True)``
is avoided on purpose, as non-commutative reverse scans have had wrong results on GPUs
(triton-lang/triton#4362). The state (a, v) at the tile's earliest position is carried
into the next tile: a_t = p*a_c + q*v_c + x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def _compose(p1, q1, x1, s1, y1, p2, q2, x2, s2, y2):
    # (1): the maps of later positions (applied first); (2): the earlier position's map.
    return (p2 * p1, p2 * q1 + q2 * s1, p2 * x1 + q2 * y1 + x2, s2 * s1, s2 * y1 + y2)


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    T, stride_row, gamma, gamma_lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * stride_row
    j = tl.arange(0, BLOCK_T)
    a_c = tl.zeros((), tl.float32)  # state (a, V) just after the current tile
    v_c = tl.zeros((), tl.float32)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - (start + j)  # back to front
        inside = t >= 0
        valid = (tl.load(mask_ptr + base + t, mask=inside, other=0) != 0) & inside
        r = tl.load(rewards_ptr + base + t, mask=inside, other=0.0)
        v = tl.load(values_ptr + base + t, mask=inside, other=0.0)
        p = tl.where(valid, gamma_lam, 1.0)
        q = tl.where(valid, gamma, 0.0)
        x = tl.where(valid, r - v, 0.0)
        s = tl.where(valid, 0.0, 1.0)
        y = tl.where(valid, v, 0.0)
        p, q, x, s, y = tl.associative_scan((p, q, x, s, y), 0, _compose)
        a = p * a_c + q * v_c + x
        v_state = s * v_c + y
        tl.store(adv_ptr + base + t, tl.where(valid, a, 0.0), mask=inside)
        tl.store(ret_ptr + base + t, tl.where(valid, a + v, 0.0), mask=inside)
        last = j == BLOCK_T - 1  # earliest time of the tile (padding lanes are identities)
        a_c = tl.sum(tl.where(last, a, 0.0), axis=0)
        v_c = tl.sum(tl.where(last, v_state, 0.0), axis=0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        block_t: int | None = None):
    """rewards, values [B, T] float32, mask [B, T] bool -> (advantages, returns) float32."""
    rewards = rewards.float().contiguous()
    values = values.float().contiguous()
    mask = mask.bool().contiguous()
    b, t = rewards.shape
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    if b == 0 or t == 0:
        return adv, ret
    if block_t is None:
        block_t = 32 if interpreting() else min(1024, max(16, triton.next_power_of_2(t)))
    num_warps = 4 if block_t <= 512 else 8
    _gae_kernel[(b,)](
        rewards, values, mask.view(torch.uint8), adv, ret,
        t, t, float(gamma), float(gamma) * float(lam),
        BLOCK_T=block_t, num_warps=num_warps,
    )
    return adv, ret
