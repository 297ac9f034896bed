"""rlfuse.integrations: rlfuse's kernels behind the names other RL trainers already call.

Drop-ins (same signatures and semantics as the originals; see docs/integrations.md):

* TRL: :func:`selective_log_softmax`, :func:`entropy_from_logits`,
  :func:`selective_log_softmax_and_entropy`, and ``rlfuse.integrations.trl.patch()`` /
  ``unpatch()`` / ``patched()`` to run TRL 1.x trainers' fused LM head on rlfuse;
* verl: :func:`logprobs_from_logits`, :func:`compute_gae_advantage_return`
  (``rlfuse.integrations.verl`` also has verl's ``entropy_from_logits``);
* OpenRLHF: :func:`log_probs_from_logits`;
* any loop: :class:`FusedLinearPPOLoss` (alias ``FusedLinearGRPOLoss``), with every
  aggregation of ``K.ppo_loss`` under the peers' names too and ``peer="verl"|"trl"|"openrlhf"``
  presets of their defaults.

Each drop-in returns the dtype the function it replaces returns on the peer's default path;
``out_dtype=`` asks for the other (docs/integrations.md, "Output dtypes").

Importing this package needs only torch and rlfuse.kernels; TRL is imported by ``patch()``.
"""

from . import openrlhf, trl, verl
from .loss import FusedLinearGRPOLoss, FusedLinearPPOLoss
from .openrlhf import log_probs_from_logits
from .trl import entropy_from_logits, selective_log_softmax, selective_log_softmax_and_entropy
from .verl import compute_gae_advantage_return, logprobs_from_logits

__all__ = [
    "FusedLinearGRPOLoss",
    "FusedLinearPPOLoss",
    "compute_gae_advantage_return",
    "entropy_from_logits",
    "log_probs_from_logits",
    "logprobs_from_logits",
    "openrlhf",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "trl",
    "verl",
]
