"""``rlfuse export``: a trained checkpoint in the ecosystem's own formats.

    default          a Hugging Face model directory: the policy LoRA merged into the base
                     (``AutoModelForCausalLM.from_pretrained(DIR)``), tokenizer + chat template,
                     and a generation_config.json that samples plain softmax(logits / T)
    --adapter-only   a peft adapter directory (``PeftModel.from_pretrained(base, DIR)``)
    --role reward    the reward model as ``AutoModelForSequenceClassification`` (num_labels=1)

The output is written to a temporary folder next to ``--out`` and renamed into place at the
end, so ``--out`` is either absent, the old export (with ``--force``), or the complete new one.

A 4-bit / 8-bit base is dequantized before the merge: the engine trained the adapter on the
dequantized weights, so W_deq + BA is the model it trained (a merge into the quantized layer
would requantize and lose the update's small values).

The reward head is an ``nn.Linear(H, 1)`` with a bias, while transformers' ``score`` layer has
none. The bias is a constant added to every score (pairwise preferences do not see it); it is
written to config.json as ``rlfuse_reward_bias`` and the export prints it: the engine's score
is ``logits + rlfuse_reward_bias``. Its ``pad_token_id`` is never the EOS (the token the score
is read at), so transformers' "rightmost non-pad token" is the engine's "last real token".
Pad on the right (transformers' positions count from column 0; the engine's count real tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# everything transformers' generate could add on top of softmax(logits / T): set to "off" so a
# checkpoint samples what the policy was trained on (transformers defaults top_k to 50 otherwise)
PLAIN_SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                      eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, suppress_tokens=None,
                      begin_suppress_tokens=None, bad_words_ids=None)


# --------------------------------------------------------------------------- output folder

def prepare_out(out, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (replacing an old export last)."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- merging

def _is_quantized_weight(w) -> bool:
    return type(w).__name__ in ("Params4bit", "Int8Params")


def _dequantized(layer) -> torch.Tensor:
    """The full-precision weight a (possibly bitsandbytes) linear layer computes with."""
    w = layer.weight
    if not _is_quantized_weight(w):
        return w.data
    from peft.utils.integrations import dequantize_bnb_weight

    state = getattr(w, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):  # bnb repacks 4-bit weights for its CPU kernel
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # on the first forward

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, state)
        state = w.quant_state
    return dequantize_bnb_weight(w, state=state or getattr(layer, "state", None))


def merged_causal_lm(backbone, adapter: str):
    """The base CausalLM with ``adapter`` merged into its weights, no peft wrapper left.
    Consumes ``backbone`` (its model is modified in place)."""
    if not backbone.quantized:
        return backbone.model.merge_and_unload(adapter_names=[adapter])
    return _merge_dequantized(backbone, adapter)


def _merge_dequantized(backbone, adapter: str):
    """Quantized base: build the same architecture unquantized and fill it with
    dequant(W) (+ the LoRA update where the adapter has one)."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = backbone.base  # the CausalLM with LoRA layers injected
    config = base.config.__class__.from_dict({k: v for k, v in base.config.to_dict().items()
                                              if k != "quantization_config"})
    compute = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
    plain = AutoModelForCausalLM.from_config(config, dtype=compute)
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            w = _dequantized(layer).to(torch.float32)
            if adapter in module.lora_A:
                w = w + module.get_delta_weight(adapter).to(torch.float32)
            state[f"{name}.weight"] = w
            if getattr(layer, "bias", None) is not None:
                state[f"{name}.bias"] = layer.bias.data
        elif isinstance(module, torch.nn.Linear) and _is_quantized_weight(module.weight):
            state[f"{name}.weight"] = _dequantized(module)
    for name, p in list(base.named_parameters()) + list(base.named_buffers()):
        if "lora_" in name or ".base_layer." in name or name in state:
            continue
        module_name = name.rsplit(".", 1)[0]
        if f"{module_name}.weight" in state:  # a quantized layer's companion tensors
            continue
        state[name] = p.data
    own = plain.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"cannot dequantize the base for export: no value for {missing[:3]}")
    plain.load_state_dict({k: state[k].to(own[k].dtype).cpu() for k in own}, strict=True)
    return plain


# --------------------------------------------------------------------------- pieces

def _export_dtype(name: str, backbone, model_cfg) -> torch.dtype:
    """``auto``: the dtype the base checkpoint declares (its config.json), else the engine's."""
    if name != "auto":
        try:
            return DTYPES[name]
        except KeyError:
            raise ValueError(f"--dtype: unknown dtype {name!r} (use auto, float32, bfloat16 or float16)") from None
    cfg_json = Path(model_cfg.name_or_path).expanduser() / "config.json"
    if cfg_json.is_file():
        data = json.loads(cfg_json.read_text())
        declared = data.get("dtype") or data.get("torch_dtype") or data.get("text_config", {}).get("dtype")
        if isinstance(declared, str) and declared in DTYPES:
            return DTYPES[declared]
    return next((p.dtype for p in backbone.base.parameters() if p.is_floating_point()), torch.float32)


def generation_config(backbone, temperature: float):
    """A generation config that samples exactly softmax(logits / T) (the engine's sampler)."""
    from transformers import GenerationConfig

    tok = backbone.tokenizer
    eos = backbone.eos_token_ids()
    return GenerationConfig(temperature=temperature, bos_token_id=tok.bos_token_id,
                            eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tok.pad_token_id,
                            **PLAIN_SAMPLING)


def _reward_pad_token_id(tokenizer) -> int:
    """A pad id that never is a reward sequence's last token. The engine reads the score at
    the last real token (the EOS); transformers' seq-cls reads the rightmost token that is not
    ``pad_token_id``, so a pad equal to the EOS (common: pad := eos) would read the one before."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    for token in (tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and tokenizer.convert_tokens_to_ids(token) != eos:
            tokenizer.pad_token = token
            return tokenizer.pad_token_id
    raise ValueError("the tokenizer has no token other than EOS to pad with; the exported reward model "
                     "would read its score one token early")


def reward_model(backbone, adapter: str = "reward"):
    """``AutoModelForSequenceClassification`` (num_labels=1) = merged reward adapter + reward head."""
    from transformers import AutoModelForSequenceClassification

    head = backbone.reward_head.proj
    causal = merged_causal_lm(backbone, adapter)
    config = causal.config.__class__.from_dict({k: v for k, v in causal.config.to_dict().items()
                                                if k not in ("quantization_config", "architectures")})
    config.num_labels = 1
    config.pad_token_id = _reward_pad_token_id(backbone.tokenizer)
    config.rlfuse_reward_bias = float(head.bias.item()) if head.bias is not None else 0.0
    dtype = next(p.dtype for p in causal.parameters() if p.is_floating_point())
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    body = getattr(model, model.base_model_prefix)
    body.load_state_dict(causal.get_decoder().state_dict())
    if not hasattr(model, "score"):
        raise ValueError(f"{type(model).__name__} has no 'score' layer; cannot place the reward head")
    with torch.no_grad():
        model.score.weight.copy_(head.weight.to(model.score.weight.dtype))
    return model


# --------------------------------------------------------------------------- export

def export(checkpoint, out, *, role: str = "policy", adapter_only: bool = False, dtype: str = "auto",
           max_shard_size: str = "5GB", force: bool = False, base_model: str | None = None,
           device: str = "cpu", overrides=None) -> dict:
    """Write ``checkpoint`` to ``out`` in the chosen format; returns what was written."""
    from .trained import find_checkpoint, load_trained

    if adapter_only and role != "policy":
        raise ValueError("--adapter-only exports the policy adapter; the reward model is exported merged "
                         "(--role reward without --adapter-only)")
    find_checkpoint(checkpoint, role)  # checkpoint errors before --out errors
    out = prepare_out(out, force)
    trained = load_trained(checkpoint, role, device=device, overrides=overrides)
    bb = trained.backbone
    target = _export_dtype(dtype, bb, trained.cfg.model)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    info = {"checkpoint": str(trained.checkpoint), "out": str(out), "role": role}
    try:
        if adapter_only:
            info.update(_write_adapter(bb, trained, tmp, base_model))
        elif role == "reward":
            model = reward_model(bb).to(target)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            info.update(format="AutoModelForSequenceClassification", reward_bias=model.config.rlfuse_reward_bias)
        else:
            temperature = trained.cfg.ppo.temperature if trained.checkpoint.parent.name == "ppo" else 1.0
            gen = generation_config(bb, temperature)
            model = merged_causal_lm(bb, trained.adapter).to(target)
            model.config.use_cache = True  # the engine turned it off for training forwards
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.generation_config = gen
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            info.update(format="AutoModelForCausalLM")
        bb.tokenizer.save_pretrained(tmp)  # with its chat template
        info["dtype"] = str(target).replace("torch.", "") if not adapter_only else "float32"
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["files"] = sorted(p.name for p in out.iterdir())
    return info


def _write_adapter(backbone, trained, tmp: Path, base_model: str | None) -> dict:
    """adapter_model.safetensors + adapter_config.json, as peft writes them."""
    from safetensors.torch import save_file

    state = backbone.adapter_state_dict(trained.adapter)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = backbone.adapter_config_dict()
    config["base_model_name_or_path"] = _base_reference(trained.cfg.model, base_model)
    config["inference_mode"] = True
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"format": "peft adapter", "base_model_name_or_path": config["base_model_name_or_path"]}


def _base_reference(model_cfg, base_model: str | None) -> str | None:
    """What ``base_model_name_or_path`` points to: --base-model, else the run's base when it
    is a folder (a .gguf file: its folder, which transformers loads with gguf_file=...); a tiny
    preset has no files, so it stays None unless --base-model names a saved copy."""
    from . import tiny

    if base_model:
        return str(Path(base_model).expanduser().resolve()) if Path(base_model).expanduser().exists() else base_model
    if model_cfg.name_or_path in tiny.PRESETS:
        return None
    p = Path(model_cfg.name_or_path).expanduser().resolve()
    return str(p.parent if p.suffix == ".gguf" else p)


def main(args) -> int:
    """The ``rlfuse export`` verb (arguments parsed by engine/cli.py)."""
    info = export(args.checkpoint, args.out, role=args.role, adapter_only=args.adapter_only, dtype=args.dtype,
                  max_shard_size=args.max_shard_size, force=args.force, base_model=args.base_model,
                  device=args.device, overrides=args.overrides)
    print(json.dumps(info, indent=2))
    if info.get("reward_bias"):
        print(f"[rlfuse] note: the reward head's bias {info['reward_bias']:.6g} is not part of transformers' "
              "score layer; engine score = logits + config.rlfuse_reward_bias")
    return 0
