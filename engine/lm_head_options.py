"""The final-logit transform a model's own LM head applies, read from its HF config, so the
fused scoring head (``K.linear_logprobs``) scores the very distribution the model samples from.

    Gemma-2/3   final_logit_softcapping = c   logits = c·tanh(logits / c)
    Cohere      logit_scale = s               logits = logits·s
    Granite     logits_scaling = d            logits = logits / d   (so logit_scale = 1/d)

Multimodal configs keep these on their ``text_config``.
"""

from __future__ import annotations


def lm_head_logit_options(config) -> dict:
    """``softcap`` and ``logit_scale`` keyword arguments for the log-prob ops (None when absent)."""
    configs = [config] + [c for c in (getattr(config, "text_config", None),) if c is not None]

    def first(name):
        for c in configs:
            value = getattr(c, name, None)
            if value is not None:
                return float(value)
        return None

    softcap = first("final_logit_softcapping")
    scale = first("logit_scale")
    divide = first("logits_scaling")
    if divide is not None and divide != 1.0:
        if divide == 0.0:
            raise ValueError(f"model config has logits_scaling = 0 ({type(config).__name__}); cannot divide by it")
        scale = (1.0 if scale is None else scale) / divide
    return {"softcap": softcap or None,  # 0 means "off" in HF configs
            "logit_scale": None if scale in (None, 1.0) else scale}
