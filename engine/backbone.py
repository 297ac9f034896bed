"""ONE frozen base model serving every RLHF role through LoRA adapters.

    role       adapter                         head                          trained
    policy     "policy"                        LM head -> fused log-probs    yes
    value      the policy's forward, or        value head                    yes
               "value" (ppo.critic=adapter)
    reference  "sft" (or the bare base)        LM head -> fused log-probs    no
    reward     "reward"                        reward head on last token     no (in PPO)

(``ROLES`` below is this table in code; other modules name adapters through it.)

Hidden states are taken from the decoder (the model without its LM head), and the LM
head is only ever applied through ``K.linear_logprobs``, which never materialises the
[tokens, vocab] logits. ``model(...).logits`` is never used for training or scoring;
``generate`` (the engine's sampler, on the last position only) is the one place the
ordinary LM head runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import rlfuse.kernels as K

from .config import ModelConfig, check_lora_targets, resolve_device


@dataclass(frozen=True)
class Role:
    adapter: str  # the LoRA adapter's name in the peft model
    head: str     # what reads its last hidden states
    stage: str    # the stage that trains it (frozen in every later one)


# The backbone's roles, the one table: every other module names adapters through it.
ROLES = {
    "policy": Role("policy", "lm_head", "ppo"),
    "reference": Role("sft", "lm_head", "sft"),  # the frozen SFT adapter (the bare base when no SFT ran)
    "reward": Role("reward", "reward_head", "rm"),
    "value": Role("value", "value_head", "ppo"),  # ppo.critic=adapter; shared: the policy's own forward
}
POLICY, REFERENCE, REWARD, VALUE = (ROLES[r].adapter for r in ("policy", "reference", "reward", "value"))
from .heads import ScalarHead, gather_last
from .lm_head_options import lm_head_logit_options
from .model_files import cached_gguf_tokenizer, check_gguf, check_model_dir, dequantized_gguf, gguf_cache_root

class _DropMissingCpuKernelNotice(logging.Filter):
    # bitsandbytes logs this at import on every AVX512-BF16 CPU without the optional `kernels`
    # package; its slower fallback is fine for us. Only this one message is dropped.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingCpuKernelNotice())

# For base models whose tokenizer has none. The generation prompt is exactly the text before an
# answer's content in the full rendering ("Assistant:\n"), so prompt tokens + answer tokens are
# the tokens of the whole chat: SFT, the reward model and PPO all see one layout. (A prompt ending
# "Assistant:" before "Assistant: {content}" taught SFT a leading space that the reward model,
# reading prompt + response tokens, never saw.) A newline, not a space, ends the role so that
# byte-level BPE tokenizers split there whether the answer is encoded alone or in the chat.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row scores like an unpadded one
    (the same rule HF ``generate`` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _adapter_key_pattern(name: str) -> str:
    """Parameter names of one peft LoRA adapter, e.g. ``...q_proj.lora_A.policy.weight``."""
    return rf"\.lora_[A-Za-z_]+\.{re.escape(name)}(\.|$)"


class Backbone:
    """A peft-wrapped causal LM plus its scalar heads. Build with :func:`load_backbone`."""

    def __init__(self, model, tokenizer, device: str, lora_config, hidden_size: int, quantized: bool,
                 compile_sampler: bool = False):
        self.model = model  # peft.PeftModel
        self.compile_sampler = compile_sampler  # torch.compile the sampler's decode step
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.lora_config = lora_config
        self.quantized = quantized
        self.base = model.get_base_model()  # the CausalLM, LoRA layers injected
        self.decoder = self.base.get_decoder()  # the CausalLM without its LM head
        self.lm_head = self.base.get_output_embeddings()
        from peft.tuners.lora import LoraLayer

        if isinstance(self.lm_head, LoraLayer):  # a name check_lora_targets does not know
            raise ValueError("model.lora_target_modules: the model's output layer got a LoRA adapter; that is not "
                             "supported (the fused log-prob head reads its base weight), drop it from the list")
        self.logit_options = lm_head_logit_options(self.base.config)  # soft-cap / scale of the model's own head
        self.value_head = ScalarHead(hidden_size).to(self.device)
        self.reward_head = ScalarHead(hidden_size).to(self.device)
        self.reference_adapter: str | None = None  # None: the bare base model
        self.dtype = self.lm_head.weight.dtype  # the frozen base's dtype; load_backbone says why
        self.dtype_reason = ""
        # prefix_share's choice for every batch (None: per batch). PPO fixes it per run, so a row
        # scores alike whatever rows share its batch (batch invariance, issue 22)
        self.share_prompts: bool | None = None
        self._trainable: set[str] = set()
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter name -> its LoRA parameters

    # ----------------------------------------------------------------- adapters

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def add_adapter(self, name: str) -> None:
        if name not in self.model.peft_config:
            self.model.add_adapter(name, self.lora_config, autocast_adapter_dtype=True)  # fp32 LoRA weights
            self._apply_trainable()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self._params:
            pattern = re.compile(_adapter_key_pattern(name))
            self._params[name] = [p for n, p in self.model.named_parameters() if pattern.search(n)]
        return list(self._params[name])

    def set_trainable(self, names) -> None:
        """Only these adapters get gradients; the base and every other adapter stay frozen."""
        self._trainable = set(names)
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        for name in self.adapters:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in self._trainable)

    @contextlib.contextmanager
    def use(self, adapter: str | None):
        """Run the backbone as one role: ``adapter=None`` means the bare base model."""
        previous = self.model.active_adapter
        if adapter is None:
            with self.model.disable_adapter():
                yield self
            return
        if adapter not in self.model.peft_config:
            raise KeyError(f"adapter {adapter!r} not loaded (have {self.adapters})")
        self.model.set_adapter(adapter)
        self._apply_trainable()  # peft's set_adapter flips requires_grad; restore ours
        try:
            yield self
        finally:
            self.model.set_adapter(previous)
            self._apply_trainable()

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        from . import distributed as D

        # under FSDP2 a sharded tensor is gathered whole (a collective: every rank calls this)
        return {k: D.full(v).detach().cpu() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        self.add_adapter(name)
        hint = "(was it trained on another base model, or with another lora_r / lora_target_modules?)"
        if getattr(self, "fsdp_units", None):  # sharded parameters: copy the whole tensors in ourselves
            from . import distributed as D

            params = dict(self.model.named_parameters())
            named = {re.sub(r"(lora_[A-Za-z_]+)\.(weight|bias)$", rf"\1.{name}.\2", k): v for k, v in state.items()}
            missing = sorted(set(named) - set(params))
            if missing:
                raise ValueError(f"adapter checkpoint does not fit adapter {name!r} {hint}: unexpected {missing[:3]}")
            D.load_into(params, named)
            return
        try:
            result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        except RuntimeError as exc:  # shape mismatch: torch lists every tensor; the first says enough
            mismatches = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            detail = (f"{mismatches[0]} (and {len(mismatches) - 1} more)" if mismatches
                      else str(exc).splitlines()[0])
            raise ValueError(f"adapter checkpoint does not fit adapter {name!r} {hint}: {detail}") from None
        missing = [k for k in result.missing_keys if re.search(_adapter_key_pattern(name), k)]
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter checkpoint does not fit adapter {name!r} {hint}: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}")

    def copy_adapter(self, src: str, dst: str) -> None:
        self.load_adapter_state_dict(dst, self.adapter_state_dict(src))

    def adapter_config_dict(self) -> dict:
        d = self.lora_config.to_dict()
        d["base_model_name_or_path"] = getattr(self.base.config, "_name_or_path", None)
        return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}

    # ----------------------------------------------------------------- forwards

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.value_head.train(mode)
        self.reward_head.train(mode)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H] of the active adapter, without the LM head."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def completion_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 prompt_len: int) -> torch.Tensor:
        """Hidden states [B, R, H] that predict the completion columns, each distinct prompt run
        once (``prefix_share.py``): hidden_states(ids, attn)[:, P-1:-1] with the same math."""
        from .prefix_share import completion_hidden_states

        return completion_hidden_states(self.decoder, input_ids, attention_mask, prompt_len, self.share_prompts)

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                       entropy: bool = False):
        """log p(labels | hidden) through the fused LM head (never a [N, V] logits tensor)."""
        bias = getattr(self.lm_head, "bias", None)
        return K.linear_logprobs(hidden, self.lm_head.weight, labels, bias=bias,
                                 temperature=temperature, return_entropy=entropy, **self.logit_options)

    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-head score of each row's last real token, with the ``reward`` adapter active."""
        with self.use(REWARD):
            hidden = self.hidden_states(input_ids, attention_mask)
        return self.reward_head(gather_last(hidden, attention_mask))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, adapter: str | None = POLICY, greedy: bool = False,
                 row_keys=None) -> torch.Tensor:
        """[B, P + R] prompt | completion tokens from the engine's own sampler (``sampler.py``):
        exactly softmax(logits / T) whatever the checkpoint's generation_config says, so the
        log-probs PPO recomputes are those of the distribution that was sampled; argmax when
        ``greedy``. ``row_keys``: one tuple of ints per row, the only source of its randomness
        (default: (a seed drawn from torch's global RNG, row index), so ``torch.manual_seed``
        still makes a call reproducible)."""
        from .sampler import sample

        if row_keys is None and not greedy:
            base = int(torch.randint(0, 2**62, (1,)).item())
            row_keys = [(base, i) for i in range(input_ids.shape[0])]
        out = sample(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     adapter=adapter, greedy=greedy, row_keys=row_keys)
        return torch.cat([input_ids, out.tokens], 1)

    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.base.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------- loading

# CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products: AVX512-BF16 (AMD Zen 4/5,
# Intel Cooper Lake and later) and AMX-BF16 (Intel Sapphire Rapids and later). Without them a bf16
# matmul has no instruction of its own (its products go through fp32 FMAs): float32 is kept there.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(vendor, feature flags) of the CPU as Linux names them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", set()
    vendor, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        if key.strip() in ("flags", "Features") and flags is None:
            flags = set(value.split())
    return vendor, flags or set()


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    return cpu_info(cpuinfo)[1]


def cpu_bf16_flags() -> list[str]:
    """This CPU's flags of native bf16 dot products (``CPU_BF16_FLAGS``); empty: none."""
    flags = cpu_flags()
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cpu_bf16_is_faster() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 faster than float32, and why. AMX-BF16: tile products, many
    times the fp32 rate. AVX512-BF16 on AMD Zen 4/5: one vdpbf16ps does the work of two fp32 FMAs
    there. AVX512-BF16 on Intel without AMX (Cooper Lake, or a VM that hides AMX): measured on such
    a Xeon, one core's vdpbf16ps loop reached 43-50 GFLOP/s against 109-173 for fp32 FMAs, bf16
    F.linear 0.66-0.79x float32 and a SmolLM2 GRPO step 0.73x (CPU time;
    benchmarks/results/cpu-intel-xeon-2c/bf16.md)."""
    vendor, flags = cpu_info()
    if "amx_bf16" in flags:
        return True, "this CPU has amx_bf16"
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return True, "this AMD CPU has avx512_bf16 (a bf16 dot product does twice an fp32 FMA's work)"
    if "avx512_bf16" in flags:
        return False, (f"this {vendor or 'non-AMD'} CPU has avx512_bf16 but no amx_bf16: bf16 matmuls are no "
                       "faster than float32 there (measured slower, issue 22)")
    return False, f"this CPU has no native bf16 dot product (none of {', '.join(CPU_BF16_FLAGS)})"


def resolve_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``model.dtype`` on ``device``: ``auto`` is bf16 on a GPU that has it (fp16
    on older ones) and on a CPU whose native bf16 dot products beat float32 (``cpu_bf16_is_faster``),
    float32 on other CPUs."""
    if name == "auto":
        if device.startswith("cuda"):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: bf16 on a CUDA device that supports it"
            return torch.float16, "auto: this CUDA device has no bf16, fp16 instead"
        forced = os.environ.get("RLFUSE_CPU_BF16", "").strip()
        if forced in ("0", "1"):  # the test suite sets 0: its results must not depend on the CPU
            return ((torch.bfloat16, "auto: bf16, RLFUSE_CPU_BF16=1") if forced == "1"
                    else (torch.float32, "auto: float32, RLFUSE_CPU_BF16=0"))
        faster, why = cpu_bf16_is_faster()
        return (torch.bfloat16, f"auto: bf16, {why}") if faster else (torch.float32, f"auto: float32, {why}")
    return _resolve_dtype(name, device), f"model.dtype={name}"


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return resolve_dtype(name, device)[0]
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype: unknown dtype {name!r} (use auto, float32, bfloat16 or float16)") from None


def _attn_implementation(name: str, device: str, dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    if device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def _quantization_config(kind: str, dtype: torch.dtype):
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization: unknown value {kind!r} (use auto, 4bit, 8bit or none)")


def _locate(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for a local model, or a clear FileNotFoundError."""
    path = Path(cfg.name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        check_gguf(path)  # a short file names itself here, not as a numpy dtype error
        return str(path.parent), path.name
    if not path.is_dir():
        raise FileNotFoundError(f"model not found: {cfg.name_or_path} (expected a preset ('tiny', 'tiny-small'), "
                                "a local model directory with config.json, or a .gguf file)")
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise FileNotFoundError(f"model file not found: {path / cfg.gguf_file}")
        check_gguf(path / cfg.gguf_file)
        return str(path), cfg.gguf_file
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf(ggufs[0])
            return str(path), ggufs[0].name
        raise FileNotFoundError(f"model not found: {path} has no config.json"
                                + (f" (several .gguf files; set model.gguf_file)" if ggufs else ""))
    _check_model_config(path / "config.json")
    check_model_dir(path)  # tokenizer and weight files present and whole (a partial download is named)
    return str(path), None


def _check_model_config(path: Path) -> None:
    """A broken config.json is a one-line error naming the file, not a transformers traceback."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a valid JSON model config ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{path}: model config has no 'model_type' (is this a Hugging Face model directory?)")


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer (with a pad token and a chat template), without loading weights,
    so data problems surface before a long model load."""
    from . import tiny

    if cfg.name_or_path in tiny.PRESETS:
        tokenizer = tiny.build_tokenizer()
    else:
        from transformers import AutoTokenizer

        directory, gguf = _locate(cfg)
        cache = gguf_cache_root(cfg.gguf_cache) if gguf else None
        if cache is not None:  # read from the .gguf once, then from the cache
            tokenizer = cached_gguf_tokenizer(Path(directory) / gguf, cache, cfg.trust_remote_code)
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # batching needs a pad token; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _load_base_model(cfg: ModelConfig, tokenizer, device: str, dtype: torch.dtype, qconfig, attn: str):
    from transformers import AutoModelForCausalLM

    from . import tiny

    if cfg.name_or_path in tiny.PRESETS:
        model = tiny.build_model(tokenizer, cfg.name_or_path)
        if qconfig is None:
            model = model.to(device=device, dtype=dtype)
            if model.config._attn_implementation != attn:
                model.set_attn_implementation(attn)
            return model
        with tempfile.TemporaryDirectory(prefix="rlfuse-tiny-") as directory:  # bnb quantizes while loading
            # every data-parallel rank loads from its OWN temporary copy: transformers would
            # otherwise write it on rank 0 only
            model.should_save_on_this_rank = lambda is_main_process: True
            model.save_pretrained(directory)
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn,
                                                        quantization_config=qconfig, device_map={"": device})
    directory, gguf = _locate(cfg)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    cache = gguf_cache_root(cfg.gguf_cache) if gguf else None
    if cache is not None:  # dequantized to `dtype` once, then loaded from the copy (model.gguf_cache)
        directory = str(dequantized_gguf(Path(directory) / gguf, dtype, cache, cfg.trust_remote_code)[0])
    elif gguf:
        kwargs["gguf_file"] = gguf  # transformers dequantizes GGUF weights to `dtype`
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return model if qconfig is not None else model.to(device)


def load_backbone(cfg: ModelConfig, *, device: str = "auto", adapters=(POLICY,), tokenizer=None) -> Backbone:
    """Load (or build, for a ``tiny`` preset) the base model, then wrap it with LoRA adapters
    named ``adapters`` (all of the same LoRA shape)."""
    from peft import LoraConfig, get_peft_model

    from . import tiny

    adapters = list(adapters)
    if not adapters:
        raise ValueError("load_backbone needs at least one adapter name")
    check_lora_targets(cfg.lora_target_modules)  # before the (long) model load
    device = resolve_device(device)
    dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    quant = cfg.quantization
    if quant == "auto":  # 4-bit pays off for real models on a GPU; bnb's CPU path is slow
        quant = "4bit" if device.startswith("cuda") and cfg.name_or_path not in tiny.PRESETS else "none"
    qconfig = _quantization_config(quant, dtype)
    attn = _attn_implementation(cfg.attn_implementation, device, dtype)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    model = _load_base_model(cfg, tokenizer, device, dtype, qconfig, attn)

    # Frozen base. We skip peft's prepare_model_for_kbit_training: it upcasts every bf16 weight
    # left (embeddings, LM head, norms) to fp32, doubling the largest unquantized tensors.
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs and LoRA
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards; generate() turns the cache on itself

    targets = cfg.lora_target_modules
    lora_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                             bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # autocast_adapter_dtype: the LoRA weights stay float32 over a bf16/fp16 base (so do their
        # gradients and AdamW state); peft casts a layer's input to them and the sum back
        peft_model = get_peft_model(model, lora_config, adapter_name=adapters[0], autocast_adapter_dtype=True)
    hidden_size = model.config.get_text_config().hidden_size
    if cfg.compile_sampler not in ("auto", "on", "off"):
        raise ValueError(f"model.compile_sampler: unknown value {cfg.compile_sampler!r} (use auto, on or off)")
    compile_sampler = cfg.compile_sampler == "on" or (cfg.compile_sampler == "auto" and device.startswith("cuda"))
    backbone = Backbone(peft_model, tokenizer, device, lora_config, hidden_size, quantized=qconfig is not None,
                        compile_sampler=compile_sampler)
    backbone.dtype, backbone.dtype_reason = dtype, dtype_reason  # summary.json's model_dtype (stage.py)
    for name in adapters[1:]:
        backbone.add_adapter(name)
    backbone.set_trainable([])
    return backbone
