"""Data-parallel runs on torch.distributed: the few collectives the trainers need.

Launch any training verb with torchrun (``torchrun --nproc-per-node N $(which rlfuse) ppo ...``
or the shortcut ``rlfuse ppo --nproc-per-node N ...``). Every rank holds the whole (4-bit)
backbone and works on its shard of the GLOBAL batch; the configured batch sizes are global.

How a loop stays world-size invariant (same adapter on 1 process and on N, up to reduction
order):

* each rank takes a contiguous block of the global batch (:func:`shard`), so GRPO/RLOO groups
  (the samples of one prompt) never straddle two ranks;
* a loss that is a mean over the global batch is computed locally as ``local_sum / global_count``
  (:func:`global_count`), and the gradients are SUMMED over ranks (:func:`reduce_gradients`), so
  every rank ends up with the gradient of the global mean, whatever the split; clipping and the
  optimizer step then run identically everywhere;
* batch statistics (advantage whitening, reward normalisation, KL control, logged metrics) are
  reduced over ranks before use (:func:`masked_whiten`, :func:`mean_std`, :func:`reduce_metrics`);
* a sample's randomness depends only on (seed, iteration, prompt index, sample index) (see
  ``engine/sampler.py``), never on which rank drew it.

With one process every function here is the identity (no process group needed), so the
single-process path is bitwise what it was. Collectives have a timeout, so a rank that dies
ends the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def init(device: str = "auto", timeout_s: float = 600.0) -> str:
    """Join the torchrun job if there is one (nccl on GPUs, gloo on CPU) and return the device
    this rank should use (``cuda:LOCAL_RANK`` for CUDA). A no-op outside torchrun."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return _rank_device(device)
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run on one process")
    dev = _rank_device(device)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def _rank_device(device: str) -> str:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{local}"
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().distributed:
        dist.barrier()


# --------------------------------------------------------------------------- sharding

def shard_bounds(n: int, w: World | None = None) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous block of ``n`` items (sizes differ by at most one)."""
    w = w or world()
    base, extra = divmod(n, w.size)
    lo = w.rank * base + min(w.rank, extra)
    return lo, lo + base + (1 if w.rank < extra else 0)


def shard(items: list, w: World | None = None) -> list:
    lo, hi = shard_bounds(len(items), w)
    return items[lo:hi]


# --------------------------------------------------------------------------- reductions

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (gloo/nccl need a contiguous tensor on the group's device)."""
    if world().distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_count(local: float | int | torch.Tensor, device=None) -> float:
    """Sum of a per-rank count (tokens, sequences, pairs) over ranks."""
    if not world().distributed:
        return float(local)
    t = torch.as_tensor(local, dtype=torch.float64, device=device or _comm_device()).reshape(1).clone()
    return float(all_reduce_sum(t).item())


def reduce_gradients(params) -> None:
    """Sum every parameter's gradient over ranks, as ONE flat message (a missing grad counts
    as zero, e.g. a rank with no rows in this minibatch). Losses are ``local_sum /
    global_count``, so the sum is the gradient of the global mean."""
    if not world().distributed:
        return
    params = [p for p in params if p.requires_grad and not is_sharded(p)]  # FSDP reduces its own
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    all_reduce_sum(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
        offset += n


def reduce_metrics(metrics: dict, weight: float = 1.0) -> dict:
    """Weighted mean over ranks of the numeric entries of ``metrics``; a key only some ranks
    logged (a rank with an empty block) is averaged over those ranks. Others pass through."""
    if not world().distributed:
        return metrics
    out = dict(metrics)
    sums: dict[str, list[float]] = {}
    for theirs, w in gather_objects(({k: float(v) for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)}, weight)):
        for k, v in theirs.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += v * w
            acc[1] += w
    for k, (total, w) in sums.items():
        out[k] = total / w if w else float("nan")
    return out


def mean_std(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(mean, unbiased std, count) of ``x`` over the masked entries of every rank."""
    m = torch.ones_like(x, dtype=torch.float64) if mask is None else mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    t = torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()]).to(_comm_device())
    s, s2, n = all_reduce_sum(t).tolist()
    mean = s / n if n else 0.0
    var = max(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return mean, var ** 0.5, n


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``K.masked_whiten`` with the mean and variance of the global batch."""
    import rlfuse.kernels as K

    if not world().distributed:
        return K.masked_whiten(x, mask)
    mean, std, _ = mean_std(x, mask)
    return (x - mean) * torch.rsqrt(torch.tensor(std * std + eps, dtype=x.dtype, device=x.device)) * mask


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    w = world()
    if not w.distributed:
        return [obj]
    out = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- FSDP2

def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded one (a collective: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def _quantized(p: torch.nn.Parameter) -> bool:  # bitsandbytes Params4bit / Int8Params
    return type(p).__module__.startswith("bitsandbytes")


def apply_fsdp(backbone) -> None:
    """Shard the backbone with FSDP2 (``fully_shard``): each decoder layer is one unit, the
    decoder (embeddings, final norm) the root. Left out of the sharding, replicated on every
    rank: bitsandbytes 4-/8-bit weights (sharding them corrupts their quantisation state after
    the first reshard) and the LM head, which ``K.linear_logprobs`` reads directly. The heads stay
    outside too; :func:`reduce_gradients` sums their gradients. FSDP SUMS the adapter gradients
    (divide factor 1), matching the ``local_sum / global_count`` losses."""
    from torch.distributed.fsdp import fully_shard

    if not world().distributed:
        return
    decoder = backbone.decoder
    keep = {p for p in backbone.model.parameters() if _quantized(p)}
    keep |= set(backbone.lm_head.parameters())
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("distributed.strategy=fsdp: the model's decoder has no .layers to shard")
    units = []
    for layer in layers:
        fully_shard(layer, ignored_params=keep & set(layer.parameters()) or None)
        units.append(layer)
    fully_shard(decoder, ignored_params=keep & set(decoder.parameters()) or None)
    units.append(decoder)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    backbone.fsdp_units = units
    n_sharded = sum(1 for p in backbone.model.parameters() if is_sharded(p))
    if world().is_main:
        print(f"[rlfuse] FSDP2: {n_sharded} parameter tensors sharded over {world().size} ranks in {len(units)} units; "
              f"{len(keep)} kept whole (4-bit weights, LM head)", flush=True)


STRATEGIES = ("ddp", "fsdp")


def prepare(backbone, strategy: str) -> None:
    """Apply the data-parallel strategy to a freshly built backbone (adapters loaded, before the
    optimizer is made): FSDP2 sharding for ``fsdp``; nothing for ``ddp`` or one process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"config key 'distributed.strategy': expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "fsdp" and world().distributed:
        apply_fsdp(backbone)
        backbone._params.clear()  # cached adapter parameter lists point at the unsharded tensors


def fsdp_units(backbone) -> list:
    return getattr(backbone, "fsdp_units", [])


class gathered:
    """Rollouts under FSDP: all-gather every unit ONCE, keep it whole for the many forwards of
    sampling and scoring (whose count differs between ranks: rows finish at different steps),
    then shard again. A no-op without FSDP."""

    def __init__(self, backbone):
        self.units = fsdp_units(backbone)

    def __enter__(self):
        for u in self.units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        return self

    def __exit__(self, *exc):
        for u in self.units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)
        return False


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a mix of FSDP-sharded (adapter) and replicated
    (head) gradients, which torch's own refuses to combine; exactly torch's without FSDP."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not is_sharded(p.grad)]
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in sharded])).float()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]).float())
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def load_into(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into (possibly FSDP-sharded) parameters."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if is_sharded(p):
                p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(value.to(p.device, p.dtype))


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded moments gathered whole (a collective), so the
    checkpoint rank 0 writes loads at any world size."""
    state = optimizer.state_dict()
    state["state"] = {k: {n: full(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a whole-tensor optimizer state into an optimizer over (possibly sharded) params."""
    from torch.distributed.tensor import distribute_tensor

    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            for n, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    optimizer.state[p][n] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


# --------------------------------------------------------------------------- launching

def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command ``rlfuse <verb> --nproc-per-node N ...`` re-runs itself under."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "rlfuse.engine.cli", *argv]
