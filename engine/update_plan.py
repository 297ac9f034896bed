"""The plan of one PPO update: every decision about its rows and weights, taken once.

``plan_update`` turns a scored rollout's response mask and the PPO settings into frozen
minibatches of weighted micro-batches; ``ppo.ppo_update`` only runs them. The plan owns:

- the global permutation: minibatches are cut from ONE permutation of the GLOBAL batch (a
  function of seed, step and epoch), so 1 process and N data-parallel ranks update on the same
  minibatches, each rank keeping its own rows (the rank cut);
- the weights: each micro-batch loss is scaled by its part of the minibatch's loss normaliser
  (tokens for token-mean, rows with a token for the seq-mean modes) across micro-batches and
  ranks, so the summed gradients are those of one pass over the global minibatch;
- FSDP stand-ins: under FSDP2 a rank with no rows in a minibatch must still run a forward and
  backward (they are collectives), so it runs row 0 weighted 0;
- the reused forward: with ONE pass over ONE minibatch and no critic, the update's own forward
  gives the old log-probs (scoring skips its policy pass; the ratio is exactly 1, as in TRL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed as D
from . import memory as M


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor   # rollout rows of this rank, one forward + backward
    loss_weight: float   # its loss x this, summed over micro-batches and ranks = the minibatch loss
    loss_share: float    # its part of this rank's minibatch loss (the logged loss)
    token_share: float   # its part of this rank's minibatch tokens (the stats are token means)


@dataclass(frozen=True)
class Minibatch:
    epoch: int
    index: int
    micro_batches: tuple[MicroBatch, ...]
    contributes: bool    # this rank has rows in it (else it only joins the collectives)
    weight: float        # this rank's part of the loss normaliser (weights the distributed metrics)


@dataclass(frozen=True)
class UpdatePlan:
    minibatches: tuple[Minibatch, ...]
    reuse_forward: bool  # old log-probs come from the update's own forward


def reuses_forward(c, n_rows: int, *, critic: bool) -> bool:
    """Whether scoring may skip the policy pass: one optimisation pass over one minibatch of all
    ``n_rows`` global rows, no critic (values need the old pass), and no KL in the reward (the
    reward's KL needs old log-probs before the update)."""
    return (c.ppo_epochs == 1 and c.minibatch_size >= n_rows and not critic
            and (c.kl_in_loss or c.kl_coef == 0))


def agg_weight(mask: torch.Tensor, loss_agg: str) -> float:
    """Rows' part of the loss normaliser: valid tokens (token-mean), else rows with a token."""
    return (mask.sum() if loss_agg == "token-mean" else (mask.sum(1) > 0).sum()).item()


def micro_batches(idx: torch.Tensor, group_size: int, size: int | None) -> list[torch.Tensor]:
    """Rows ``idx`` of a minibatch cut into micro-batches of at most ``size`` rows (None: one),
    keeping the ``group_size`` samples of a prompt (rollout rows k*G .. k*G+G-1) together, so
    each micro-batch's forward still runs its prompts once. A row's PPO loss stands alone, so a
    group larger than ``size`` is cut (unlike a ranking, see ``memory.micro_batches``)."""
    if size is None or size >= len(idx):
        return [idx]
    idx = idx.sort().values
    _, counts = torch.unique_consecutive(idx // max(1, group_size), return_counts=True)
    pieces = [piece for group in idx.split(counts.tolist()) for piece in group.split(size)]
    return [torch.cat([pieces[i] for i in batch]) for batch in M.micro_batches([len(p) for p in pieces], size)]


def check_micro_batch_size(size) -> None:
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise ValueError(f"ppo.micro_batch_size must be a positive integer (or null: the whole minibatch), "
                         f"got {size!r}")


def _minibatch(mask, idx, epoch: int, index: int, c, *, fsdp: bool) -> Minibatch:
    distributed = D.world().distributed
    weight = agg_weight(mask[idx], c.loss_agg)
    tokens = mask[idx].sum().item()
    share = weight / D.global_count(weight) if distributed else 1.0  # this rank's part of the normaliser
    contributes = len(idx) > 0
    if not contributes and fsdp:
        idx, share = torch.zeros(1, dtype=torch.long, device=mask.device), 0.0
    pieces = micro_batches(idx, c.n_samples, c.micro_batch_size) if len(idx) else []
    micros = []
    for rows in pieces:
        loss_share = agg_weight(mask[rows], c.loss_agg) / weight if weight else 1.0 / len(pieces)
        token_share = mask[rows].sum().item() / tokens if tokens else 1.0 / len(pieces)
        micros.append(MicroBatch(rows, loss_share * share if distributed else loss_share, loss_share, token_share))
    return Minibatch(epoch, index, tuple(micros), contributes, weight)


def plan_update(response_mask: torch.Tensor, c, *, critic: bool, scored_policy: bool, shuffle_seed: int,
                fsdp: bool = False) -> UpdatePlan:
    """The update of one iteration over this rank's rollout rows (``response_mask`` [B, R]).
    ``scored_policy``: scoring ran the policy pass (old log-probs exist); when it did not, the
    plan must be one that reuses the update's forward."""
    check_micro_batch_size(c.micro_batch_size)
    w = D.world()
    rows = D.gather_objects(len(response_mask))
    first, n_global = sum(rows[:w.rank]), sum(rows)
    if not scored_policy and not reuses_forward(c, n_global, critic=critic):  # the rule scoring followed
        raise ValueError("ppo_update: a rollout scored without its policy pass needs ppo_epochs=1, one minibatch "
                         f"(minibatch_size >= {n_global}), no critic and no KL in the reward")
    minibatches = []
    for epoch in range(c.ppo_epochs):
        g = torch.Generator().manual_seed(shuffle_seed * 1_000_003 + epoch)
        for i, global_idx in enumerate(torch.randperm(n_global, generator=g).split(max(1, c.minibatch_size))):
            local = global_idx[(global_idx >= first) & (global_idx < first + len(response_mask))] - first
            minibatches.append(_minibatch(response_mask, local.to(response_mask.device), epoch, i, c, fsdp=fsdp))
    return UpdatePlan(tuple(minibatches), reuse_forward=not scored_policy)
