"""gae: generalised advantage estimation over a right-padded [B, T] batch.

rlfuse (``K.gae`` with the response mask) against
  * python_loop - the per-timestep Python loop TRL, verl and OpenRLHF use: mask the
                  values/rewards, then T steps of [B]-sized tensor ops walking back in time.

Rewards are dense (a per-token KL penalty plus a score on the last token, as in PPO
rollouts), response lengths uniform in [T/2, T]; gamma=1, lam=0.95. There is no backward.
"""

from __future__ import annotations

from . import baselines as B
from .spec import OpBench, Target


class GaeBench(OpBench):
    op = "gae"
    title = "gae (advantages + returns, [B, T])"
    modes = ("fwd",)
    baselines = ("python_loop",)
    x_key = "T"
    descriptions = {
        "rlfuse": "rlfuse.kernels.gae(rewards, values, mask)",
        "python_loop": "per-timestep Python loop over T (TRL / verl / OpenRLHF style)",
    }
    sizes_by_preset = {
        "target": [dict(B=256, T=1024)],
        "quick": [dict(B=64, T=256), dict(B=256, T=1024)],
        "full": [dict(B=64, T=256), dict(B=256, T=1024), dict(B=512, T=2048), dict(B=1024, T=4096)],
        "gpu": [dict(B=256, T=1024), dict(B=512, T=2048)],
    }
    targets = (
        Target("gae", dict(B=256, T=1024), "fwd", "python_loop", "speedup", 40.0,
               "gae >= 40x faster than the per-timestep Python loop (B=256, T=1024)"),
        Target("gae", dict(B=256, T=1024), "fwd", "", "floor_fraction", 0.6,
               "gae >= 60% of the memory-bandwidth floor (B=256, T=1024)"),
        Target("gae", dict(B=512, T=2048), "fwd", "python_loop", "speedup", 100.0,
               "GPU: gae >= 100x faster than the Python loop (B=512, T=2048)", device="cuda"),
    )

    x_label = "tokens B x T"

    def setup(self, size, device):
        import torch
        b, t = int(size["B"]), int(size["T"])
        gen = torch.Generator(device="cpu").manual_seed(0)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        rewards = -0.05 * torch.rand(b, t, generator=gen)
        rewards[torch.arange(b), lengths - 1] += torch.randn(b, generator=gen)
        values = torch.randn(b, t, generator=gen)
        return {"rewards": (rewards * mask).to(device), "values": values.to(device), "mask": mask.to(device)}

    def bytes_moved(self, size, mode):
        # float32 rewards + values and the bool mask read once; advantages + returns written once
        return int(size["B"]) * int(size["T"]) * (4 + 4 + 1 + 4 + 4)

    def forward(self, impl, inp, state):
        if impl.startswith("rlfuse"):
            import rlfuse.kernels as K
            return K.gae(inp["rewards"], inp["values"], inp["mask"], gamma=1.0, lam=0.95)
        if impl == "python_loop":
            return B.gae_python_loop(inp["rewards"], inp["values"], inp["mask"], gamma=1.0, lam=0.95)
        raise KeyError(impl)


BENCH = GaeBench()


def test_gae(benchmark, bench_case):
    from .pytest_bridge import run_benchmark
    run_benchmark(benchmark, bench_case)
