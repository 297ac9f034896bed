"""Memory helpers: ``release_memory`` (returns freed heap pages to the OS), ``micro_batches``
(bounds the rows of one training forward), and the peak memory of one PPO step with ONE
shared backbone vs the usual FOUR separate models:

    shared    one base + LoRA adapters policy / sft / reward + value and reward heads
    separate  policy, reference, reward and value models, each a full copy of the base
              (policy and value each with their own LoRA, reward with its LoRA + head)

Both run the same step on the same model and batch: score (policy log-probs + values,
reference log-probs, reward) without grad, then one PPO update (forward, backward,
optimizer step). Both train LoRA adapters, so the difference is the sharing alone.

Each setup runs in a fresh subprocess so neither sees the other's allocations, measured by
:class:`PeakMeter` (also the benchmarks' meter: ``rlfuse bench --scenarios memory`` runs
``measure`` in its child pool) from after a warm-up step on the tiny preset (imports, one-off
buffers), i.e. what the models and the step added.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def release_memory() -> None:
    """Collect garbage, then hand the heap pages that are now free back to the OS
    (glibc's ``malloc_trim``): without it a dropped model's ~1 GB stays resident, since
    glibc keeps freed memory in its arenas for reuse. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def micro_batches(sizes: list[int], max_rows: int | None, max_items: int | None = None) -> list[list[int]]:
    """Consecutive groups of item indices, each holding at most ``max_rows`` rows (the sum of
    ``sizes``) and ``max_items`` items: one forward (and backward) per group bounds the
    activations a step keeps alive. An item larger than ``max_rows`` (a ranking of many
    responses, whose loss needs all of its scores together) forms a group of its own.
    ``None``: no bound. No items: no groups."""
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(sizes):
        if (not groups or (max_rows is not None and rows + n > max_rows)
                or (max_items is not None and len(groups[-1]) >= max_items)):
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups


def same_count_on_every_rank(groups: list[list[int]], backbone) -> list[list[int]]:
    """Under FSDP2 every rank must run as many forwards and backwards (each is a collective):
    pad with empty groups, which a stage runs as a stand-in row weighted 0, up to the largest
    count of any rank. Without FSDP the groups are returned as they are."""
    from . import distributed as D

    if not D.fsdp_units(backbone):
        return groups
    most = max(D.gather_objects(len(groups)))
    return groups + [[] for _ in range(most - len(groups))]


class PeakMeter:
    """Peak memory of the code between ``start()`` and ``peak_extra()``: the one meter of rlfuse's
    measurements (``rlfuse memory``, every benchmark). CUDA: ``max_memory_allocated`` over what
    was allocated at ``start()``. CPU: the peak RSS over the RSS at ``start()``, the kernel's
    high-water mark reset there (``/proc/self/clear_refs``, after ``release_memory`` so freed heap
    pages are not silently reused) and read with the resets the engine's per-phase meter
    (``metrics.MemoryPhases``) makes in between folded in; where the mark cannot be reset,
    ``ru_maxrss`` (the process's lifetime peak) and ``exact`` is False."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.exact = self.cuda or _can_reset_peak()
        self.method = ("torch.cuda.max_memory_allocated - allocated at start" if self.cuda else
                       "VmHWM reset via /proc/self/clear_refs" if self.exact else "ru_maxrss (approximate)")
        self.base = 0

    def now(self) -> int:
        """Bytes resident now (CPU, after a collection and malloc_trim) or allocated (CUDA)."""
        from .metrics import rss_mb

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        release_memory()
        return int(rss_mb() * 2**20)

    def start(self) -> int:
        """Start counting here; returns the bytes held now (the base)."""
        from . import metrics

        self.base = self.now()
        metrics._PROCESS_PEAK[0] = 0.0  # the peak counts from here, not from the process's start
        metrics.reset_peak_memory(self.device)
        return self.base

    def peak(self) -> int:
        """Peak bytes since ``start()`` (absolute, base included)."""
        from .metrics import process_peak_rss_mb

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return int(process_peak_rss_mb() * 2**20)

    def peak_extra(self) -> int:
        return max(0, self.peak() - self.base)


def _can_reset_peak() -> bool:
    """Whether this kernel lets ``metrics.reset_peak_memory`` reset the RSS high-water mark."""
    from .metrics import _proc_status_mb

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _fake_rollout(tokenizer, batch_size: int, seq_len: int, device):
    """A scored-shape rollout of random tokens: prompt = first half, completion = second half."""
    from .rollout import Rollout

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tokenizer), (batch_size, seq_len), generator=g).to(device)
    P = seq_len // 2
    mask = torch.ones(batch_size, seq_len - P, device=device)
    return Rollout(ids, torch.ones_like(ids), P, mask, [""] * batch_size, [""] * batch_size)


def _ppo_loss(logp, ro, values=None):
    import rlfuse.kernels as K

    adv = torch.randn_like(ro.logp)
    return K.ppo_loss(logp, ro.logp, adv, ro.response_mask, ref_logp=ro.ref_logp, kl_coef=0.05,
                      values=values, old_values=None if values is None else ro.values,
                      returns=None if values is None else torch.zeros_like(ro.logp))[0]


def _step_shared(model_cfg, device, batch_size, seq_len):
    from .backbone import load_backbone
    from .optim import make_optimizer
    from .rollout import policy_outputs

    bb = load_backbone(model_cfg, device=device, adapters=["policy", "sft", "reward"])
    bb.reference_adapter = "sft"
    bb.set_trainable(["policy"])
    opt = make_optimizer(bb.adapter_parameters("policy") + list(bb.value_head.parameters()), lr=1e-4,
                         device=device, kind=model_cfg.optimizer)
    ro = _fake_rollout(bb.tokenizer, batch_size, seq_len, device)
    P = ro.prompt_len
    with torch.no_grad():  # scoring: three forwards of one model
        with bb.use("policy"):
            ro.logp, _, ro.values = policy_outputs(bb, ro.input_ids, ro.attention_mask, P, temperature=1.0,
                                                   with_values=True)
        with bb.use("sft"):
            h = bb.hidden_states(ro.input_ids, ro.attention_mask)[:, P - 1: -1]
            ro.ref_logp = bb.token_logprobs(h, ro.labels)
        bb.reward_scores(ro.input_ids, ro.attention_mask)
    with bb.use("policy"):  # update
        logp, _, values = policy_outputs(bb, ro.input_ids, ro.attention_mask, P, temperature=1.0, with_values=True)
    _ppo_loss(logp, ro, values).backward()
    opt.step()


def _step_separate(model_cfg, device, batch_size, seq_len):
    from .backbone import load_backbone
    from .optim import make_optimizer

    policy = load_backbone(model_cfg, device=device, adapters=["policy"])
    reference = load_backbone(model_cfg, device=device, adapters=["sft"])
    reward = load_backbone(model_cfg, device=device, adapters=["reward"])
    value = load_backbone(model_cfg, device=device, adapters=["value"])
    policy.set_trainable(["policy"])
    value.set_trainable(["value"])
    opt_p = make_optimizer(policy.adapter_parameters("policy"), lr=1e-4, device=device, kind=model_cfg.optimizer)
    opt_v = make_optimizer(value.adapter_parameters("value") + list(value.value_head.parameters()), lr=1e-4,
                           device=device, kind=model_cfg.optimizer)
    ro = _fake_rollout(policy.tokenizer, batch_size, seq_len, device)
    P = ro.prompt_len

    def logp_of(bb, adapter):
        with bb.use(adapter):
            return bb.token_logprobs(bb.hidden_states(ro.input_ids, ro.attention_mask)[:, P - 1: -1], ro.labels)

    def values_of():
        with value.use("value"):
            return value.value_head(value.hidden_states(ro.input_ids, ro.attention_mask)[:, P - 1: -1])

    with torch.no_grad():  # scoring: four models, one forward each
        ro.logp = logp_of(policy, "policy")
        ro.values = values_of()
        ro.ref_logp = logp_of(reference, "sft")
        reward.reward_scores(ro.input_ids, ro.attention_mask)
    loss = _ppo_loss(logp_of(policy, "policy"), ro, values_of())  # update both trained models
    loss.backward()
    opt_p.step()
    opt_v.step()


def measure(mode: str, *, model: str = "tiny", device: str = "cpu", batch_size: int = 4, seq_len: int = 128,
            quantization: str = "auto") -> int:
    """Peak bytes of one PPO step in THIS process (call it in a fresh one)."""
    import gc

    from .config import ModelConfig

    cfg = ModelConfig(name_or_path=model, quantization=quantization)
    step = {"shared": _step_shared, "separate": _step_separate}[mode]
    # warm-up on the tiny preset: lazy imports, one-off buffers and allocator pools are
    # then part of the baseline, not of the measured step
    step(ModelConfig(name_or_path="tiny"), device, 2, 16)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    meter = PeakMeter(device)
    meter.start()
    step(cfg, device, batch_size, seq_len)
    return meter.peak_extra()


def compare_memory(model: str = "tiny-small", *, device: str = "auto", batch_size: int = 4, seq_len: int = 128,
                   quantization: str = "auto", timeout: float = 900) -> dict:
    """Peak memory of one PPO step, shared backbone vs four models -> numbers and their ratio."""
    from .config import resolve_device

    device = resolve_device(device)
    results = {}
    for mode in ("shared", "separate"):
        cmd = [sys.executable, "-m", "rlfuse.engine.memory", "--mode", mode, "--model", model, "--device", device,
               "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--quantization", quantization]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement ({mode}) failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    mb = 2**20
    return {"model": model, "device": device, "batch_size": batch_size, "seq_len": seq_len,
            "metric": "max_memory_allocated" if device.startswith("cuda") else "peak RSS minus RSS after warm-up",
            "shared_mb": results["shared"] / mb, "separate_mb": results["separate"] / mb,
            "ratio": results["shared"] / results["separate"]}


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["shared", "separate"], required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quantization", default="auto")
    a = p.parse_args(argv)
    peak = measure(a.mode, model=a.model, device=a.device, batch_size=a.batch_size, seq_len=a.seq_len,
                   quantization=a.quantization)
    print(json.dumps({"mode": a.mode, "peak_bytes": peak}))


if __name__ == "__main__":
    _main()
