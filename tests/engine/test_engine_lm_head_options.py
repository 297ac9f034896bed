"""The fused scoring head applies the model's own final-logit transform (Gemma-2 soft-cap,
Cohere logit_scale, Granite logits_scaling), so Backbone.token_logprobs equals log_softmax of
the model's own ``.logits`` on those models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import rlfuse.kernels as K
from rlfuse.engine.backbone import Backbone
from rlfuse.engine.lm_head_options import lm_head_logit_options

_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def _tiny_model(kind: str):
    import transformers as tf

    if kind == "gemma2":
        cfg = tf.Gemma2Config(**_TINY, head_dim=16, final_logit_softcapping=2.5, query_pre_attn_scalar=16)
        return tf.Gemma2ForCausalLM(cfg), {"softcap": 2.5, "logit_scale": None}
    if kind == "cohere":
        cfg = tf.CohereConfig(**_TINY, logit_scale=0.3)
        return tf.CohereForCausalLM(cfg), {"softcap": None, "logit_scale": 0.3}
    cfg = tf.GraniteConfig(**_TINY, logits_scaling=4.0)
    return tf.GraniteForCausalLM(cfg), {"softcap": None, "logit_scale": 0.25}


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_token_logprobs_match_the_models_own_logits(kind):
    torch.manual_seed(0)
    base, expected_options = _tiny_model(kind)
    with torch.no_grad():  # logits big enough that the cap / scale changes the distribution
        base.get_output_embeddings().weight.mul_(20.0)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    bb = Backbone(model, None, "cpu", model.peft_config["default"], 32, False)
    assert bb.logit_options == expected_options

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask).logits.float()  # the model's own head
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        hidden = bb.hidden_states(ids, mask)[:, :-1]
        got = bb.token_logprobs(hidden, ids[:, 1:])
        plain = K.linear_logprobs(hidden, bb.lm_head.weight, ids[:, 1:])  # without the model's transform
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-2, "the transform must matter for this test to mean anything"


def test_lm_head_logit_options_from_configs():
    from types import SimpleNamespace as NS

    assert lm_head_logit_options(NS()) == {"softcap": None, "logit_scale": None}
    assert lm_head_logit_options(NS(final_logit_softcapping=30.0)) == {"softcap": 30.0, "logit_scale": None}
    assert lm_head_logit_options(NS(final_logit_softcapping=None, logit_scale=0.0625))["logit_scale"] == 0.0625
    assert lm_head_logit_options(NS(logits_scaling=8.0))["logit_scale"] == 0.125
    # multimodal Gemma-3: the text model's config holds the cap
    assert lm_head_logit_options(NS(text_config=NS(final_logit_softcapping=30.0)))["softcap"] == 30.0
    with pytest.raises(ValueError, match="logits_scaling"):
        lm_head_logit_options(NS(logits_scaling=0.0))
