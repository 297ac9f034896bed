"""rlfuse.kernels: fused RLHF ops with interchangeable backends (torch, cpp, triton, cuda).

    import rlfuse.kernels as K
    logp = K.linear_logprobs(hidden, lm_head.weight, labels)      # no [N, V] logits
    adv, ret = K.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    loss, stats = K.ppo_loss(logp, old_logp, adv, mask, clip_eps=0.2)

Importing this package needs only torch; it never imports rlfuse.engine.

This file is the package's ``__init__.py`` once installed (setup.py installs it under that name).
The source folder has no ``__init__.py`` on purpose: run from the repository root, a regular
package ``kernels/`` would shadow Hugging Face's ``kernels`` (which transformers imports).
"""

# An editable install is a link tree whose files are symlinks to the sources (see setup.py); look
# up this package's modules in the source folder itself first, so a new source file imports at
# once, as in any editable install. (A regular install has no symlink here: nothing changes.)
import os as _os

_source = _os.path.dirname(_os.path.realpath(__file__))
if _source != _os.path.dirname(_os.path.abspath(__file__)):
    __path__.insert(0, _source)
del _os, _source


from .dispatch import available_backends, current_backend, unavailable_reasons, use_backend
from .gae import gae
from .linear_logprobs import linear_logprobs
from .logprobs import logprobs_from_logits
from .ppo_loss import ppo_loss
from .whiten import masked_whiten

__all__ = [
    "available_backends",
    "current_backend",
    "gae",
    "linear_logprobs",
    "logprobs_from_logits",
    "masked_whiten",
    "ppo_loss",
    "unavailable_reasons",
    "use_backend",
]
__version__ = "0.1.0"
