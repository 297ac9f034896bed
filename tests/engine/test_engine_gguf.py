"""Loading a model and its tokenizer from a .gguf file (written here from the tiny preset)."""

import pytest
import torch

from rlfuse.engine import tiny
from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.config import ModelConfig
from rlfuse.engine.data import pad

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """model.gguf_cache's default folder, here and not in the home directory."""
    monkeypatch.setenv("RLFUSE_CACHE", str(tmp_path / "cache"))


def _permute(w, n_head):
    """HF q/k rows -> llama.cpp's rotary layout (transformers undoes this when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, tokenizer, model):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tiny.SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_chat_template(tiny.CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()})
    for name, tensor in model.state_dict().items():
        a = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(names[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_model_tokenizer_and_chat_template(tmp_path):
    tok = tiny.build_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tok, tiny.build_model(tok))

    ref = load_backbone(ModelConfig(), device="cpu")
    from_file = load_backbone(ModelConfig(name_or_path=str(path)), device="cpu")
    ids, mask = pad([[5, 40, 41, 42, 2], [5, 50]], 0, side="left")
    with torch.no_grad():
        torch.testing.assert_close(from_file.hidden_states(ids, mask), ref.hidden_states(ids, mask))
    text = "<|user|>hi é</s><|assistant|>"
    assert from_file.tokenizer(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert from_file.tokenizer.chat_template == tiny.CHAT_TEMPLATE
    assert from_file.tokenizer.eos_token == "</s>" and from_file.eos_token_ids() == [2]

    # the same file named as directory + model.gguf_file
    by_dir = load_backbone(ModelConfig(name_or_path=str(tmp_path), gguf_file="tiny.gguf"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(by_dir.hidden_states(ids, mask), ref.hidden_states(ids, mask))


def test_gguf_is_dequantized_once_per_dtype_and_cached(tmp_path, monkeypatch):
    """model.gguf_cache: the first load writes a safetensors copy in the resolved dtype (and the
    tokenizer), later loads read the copy, not the .gguf; ``off`` writes nothing."""
    import transformers

    tok = tiny.build_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tok, tiny.build_model(tok))
    cache = tmp_path / "mine"
    ref = load_backbone(ModelConfig(), device="cpu")
    first = load_backbone(ModelConfig(name_or_path=str(path), dtype="float32", gguf_cache=str(cache)), device="cpu")
    (key,) = (cache / "models").iterdir()
    assert key.name.startswith("tiny-") and {p.name for p in key.iterdir()} == {"float32", "tokenizer"}
    assert (key / "float32" / "model.safetensors").is_file() and not (key / "float32" / "tokenizer.json").exists()

    real = transformers.AutoModelForCausalLM.from_pretrained
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    again = load_backbone(ModelConfig(name_or_path=str(path), dtype="float32", gguf_cache=str(cache)), device="cpu")
    assert seen == [None]  # read from the copy, not the .gguf
    ids, mask = pad([[5, 40, 41, 42, 2], [5, 50]], 0, side="left")
    with torch.no_grad():
        for bb in (first, again):
            torch.testing.assert_close(bb.hidden_states(ids, mask), ref.hidden_states(ids, mask))
    assert again.tokenizer.chat_template == tiny.CHAT_TEMPLATE and again.eos_token_ids() == [2]

    # another dtype is another copy beside the first; off reads the .gguf and writes nothing
    half = load_backbone(ModelConfig(name_or_path=str(path), dtype="bfloat16", gguf_cache=str(cache)), device="cpu")
    assert half.lm_head.weight.dtype == torch.bfloat16 and (key / "bfloat16" / "model.safetensors").is_file()
    seen.clear()
    load_backbone(ModelConfig(name_or_path=str(path), dtype="float32", gguf_cache="off"), device="cpu")
    assert seen == ["tiny.gguf"] and not (tmp_path / "cache").exists()
