"""The ``tiny`` preset: a 2-layer Llama with random weights and an offline byte-level
tokenizer, so tests and laptop runs need no download.

The weights come from a fixed seed (independent of the run's seed and of the global
RNG), so every stage of a run, and a resumed run, sees the same base model.
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BASE_SEED = 1234
# random-weight presets, selected with model.name_or_path
PRESETS = {
    "tiny": {},  # ~0.1M params: tests and laptop smoke runs
    "tiny-small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,  # ~12M params:
                       num_attention_heads=8, num_key_value_heads=4),  # weights dominate memory
}


def build_tokenizer():
    """Byte-level BPE with no merges: every byte is a token (256 + 7 specials)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_model(tokenizer, preset: str = "tiny", **overrides):
    from transformers import LlamaForCausalLM

    config = build_config(len(tokenizer), **{**PRESETS[preset], **overrides})
    with torch.random.fork_rng(devices=[]):  # fixed weights, global RNG untouched
        torch.manual_seed(BASE_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
