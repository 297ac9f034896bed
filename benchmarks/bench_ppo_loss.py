"""ppo_loss: the PPO objective with every term on (clipped surrogate, k3 KL to the
reference, entropy bonus, clipped value loss), token-mean over the response mask.

rlfuse (``K.ppo_loss``) against
  * eager         - the same loss written in eager PyTorch the way TRL's PPOTrainer /
                    OpenRLHF write it (autograd builds the backward), with its stats;
  * torch_compile - ``torch.compile`` of that eager function (Inductor), compile time
                    excluded (it is reported as the warm-up time).

Gradients flow to logp, entropy and values. "fwd" here is the training forward (autograd
recording), since the loss is never evaluated without a backward.
"""

from __future__ import annotations

from . import baselines as B
from .spec import OpBench, Target

COEFS = dict(clip_eps=0.2, kl_coef=0.05, entropy_coef=0.01, value_clip=0.2, value_coef=0.5)


class PpoLossBench(OpBench):
    op = "ppo_loss"
    title = "ppo_loss (policy + value + KL + entropy terms)"
    fwd_no_grad = False
    baselines = ("eager", "torch_compile")
    x_key = "N"
    x_label = "tokens N"
    timeout_s = 900
    descriptions = {
        "rlfuse": "rlfuse.kernels.ppo_loss(..., ref_logp, entropy, values, old_values, returns)",
        "eager": "eager PyTorch PPO loss (TRL / OpenRLHF style) with detached stats",
        "torch_compile": "torch.compile(eager PPO loss), Inductor default mode; compile time excluded",
    }
    sizes_by_preset = {
        "target": [dict(N=1 << 20)],
        "quick": [dict(N=1 << 16), dict(N=1 << 18)],
        "full": [dict(N=1 << 16), dict(N=1 << 18), dict(N=1 << 20), dict(N=1 << 22)],
        "gpu": [dict(N=1 << 20), dict(N=1 << 22)],
    }
    targets = (
        Target("ppo_loss", dict(N=1 << 20), "fwd+bwd", "eager", "speedup", 2.0,
               "ppo_loss (value, KL, entropy terms) fwd+bwd >= 2x faster than eager PyTorch at 1M tokens"),
        Target("ppo_loss", dict(N=1 << 20), "fwd", "", "floor_fraction", 0.6,
               "ppo_loss fwd >= 60% of the memory-bandwidth floor at 1M tokens"),
        Target("ppo_loss", dict(N=1 << 20), "fwd+bwd", "eager", "speedup", 3.0,
               "GPU: ppo_loss fwd+bwd >= 3x faster than eager at 1M tokens", device="cuda"),
        Target("ppo_loss", dict(N=1 << 20), "fwd+bwd", "torch_compile", "speedup", 1.0,
               "GPU: ppo_loss fwd+bwd >= 1x torch.compile at 1M tokens", device="cuda"),
    )

    def unavailable(self, impl, device):
        if impl == "torch_compile":
            return B.compile_unavailable(device)
        return None

    def setup(self, size, device):
        import torch
        n = int(size["N"])
        t = 1024 if n % 1024 == 0 and n >= 1024 else n
        shape = (n // t, t)
        g = torch.Generator(device="cpu").manual_seed(0)

        def r(scale=1.0, shift=0.0):
            return torch.randn(shape, generator=g) * scale + shift

        old_logp = r(1.0, -2.0)
        inp = {
            "logp": old_logp + r(0.15),
            "old_logp": old_logp,
            "ref_logp": old_logp + r(0.1),
            "advantages": r(),
            "mask": torch.rand(shape, generator=g) < 0.9,
            "entropy": torch.rand(shape, generator=g) * 3.0,
            "values": r(),
            "old_values": r(),
            "returns": r(),
        }
        inp = {k: v.to(device) for k, v in inp.items()}
        for k in ("logp", "entropy", "values"):
            inp[k].requires_grad_(True)
        return inp

    def forward(self, impl, inp, state):
        args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
        kw = dict(ref_logp=inp["ref_logp"], entropy=inp["entropy"], values=inp["values"],
                  old_values=inp["old_values"], returns=inp["returns"], **COEFS)
        if impl.startswith("rlfuse"):
            import rlfuse.kernels as K
            return K.ppo_loss(*args, **kw)
        if impl == "eager":
            return B.ppo_loss_eager(*args, **kw)
        if impl == "torch_compile":
            return B.ppo_loss_compiled()(*args, **kw)
        raise KeyError(impl)

    def grad_targets(self, inp):
        return [inp["logp"], inp["entropy"], inp["values"]]

    def loss(self, out, inp):
        return out[0]

    def bytes_moved(self, size, mode):
        # eight float32 per-token inputs and the bool mask read once (33 B/token); fwd+bwd also
        # writes the gradients of logp, entropy and values once (12 B/token)
        return int(size["N"]) * (33 if mode == "fwd" else 45)


BENCH = PpoLossBench()


def test_ppo_loss(benchmark, bench_case):
    from .pytest_bridge import run_benchmark
    run_benchmark(benchmark, bench_case)
