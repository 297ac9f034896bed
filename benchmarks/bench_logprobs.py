"""logprobs_from_logits: log-probs of chosen tokens from a [B, T, V] logits tensor.

rlfuse (``K.logprobs_from_logits``) against
  * log_softmax_gather   - ``torch.log_softmax(logits, -1).gather(...)``, the textbook form;
  * trl_selective_rows   - TRL-style selective_log_softmax: label logits minus a per-batch-row
                           logsumexp (Python loop over the batch);
  * chunked_torch        - Unsloth/verl chunked log-probs: float32 row chunks, logsumexp + gather;
  * trl_selective_log_softmax (peer, CUDA) - the installed TRL function, which dispatches to
                           TRL's fused Triton kernel on GPUs.

fwd is the scoring path (no_grad); fwd+bwd back-propagates sum(logp) into the logits.
Sequences are 1024 tokens long (the batch is N/1024 rows) unless N < 1024.
"""

from __future__ import annotations

from . import baselines as B
from .spec import OpBench, Target, random_normal


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class LogprobsBench(OpBench):
    op = "logprobs"
    title = "logprobs_from_logits (logits -> log p(label))"
    baselines = ("log_softmax_gather", "trl_selective_rows", "chunked_torch")
    peers = ("trl_selective_log_softmax",)
    x_key = "N"
    x_label = "tokens N (x vocab V)"
    descriptions = {
        "rlfuse": "rlfuse.kernels.logprobs_from_logits",
        "log_softmax_gather": "torch.log_softmax(logits, -1).gather(-1, labels)",
        "trl_selective_rows": "TRL-style selective_log_softmax: gather - per-row logsumexp (loop over batch)",
        "chunked_torch": "Unsloth/verl chunked: float32 row chunks of 1024, gather - logsumexp",
        "trl_selective_log_softmax": "installed trl.trainer.utils.selective_log_softmax (Triton on GPU)",
    }
    sizes_by_preset = {
        "target": [dict(N=4096, V=32000, dtype="float32")],
        "quick": [dict(N=512, V=32000, dtype="float32"), dict(N=1024, V=32000, dtype="float32")],
        "full": [dict(N=1024, V=32000, dtype="float32"), dict(N=4096, V=32000, dtype="float32"),
                 dict(N=4096, V=128256, dtype="float32")],
        "gpu": [dict(N=4096, V=128256, dtype="bfloat16"), dict(N=16384, V=128256, dtype="bfloat16")],
    }
    targets = (
        Target("logprobs", dict(N=4096, V=32000, dtype="float32"), "fwd+bwd", "log_softmax_gather",
               "speedup", 1.5, "logprobs fwd+bwd >= 1.5x faster than log_softmax+gather (N=4096, V=32000, fp32)"),
        Target("logprobs", dict(N=4096, V=32000, dtype="float32"), "fwd+bwd", "log_softmax_gather",
               "memory_lower", 1.0, "logprobs fwd+bwd lower peak memory than log_softmax+gather"),
        # roofline (roofline.py): fractions of the bandwidth floor measured in the same run
        Target("logprobs", dict(N=4096, V=32000, dtype="float32"), "fwd", "", "floor_fraction", 0.6,
               "logprobs fwd >= 60% of the memory-bandwidth floor (N=4096, V=32000, fp32)"),
        Target("logprobs", dict(N=4096, V=32000, dtype="float32"), "fwd+bwd", "", "floor_fraction", 0.5,
               "logprobs fwd+bwd <= 2x the memory-bandwidth floor (N=4096, V=32000, fp32)"),
        Target("logprobs", dict(N=16384, V=128256, dtype="bfloat16"), "fwd+bwd", "log_softmax_gather",
               "speedup", 1.0, "GPU: logprobs bf16 fwd+bwd vs log_softmax+gather eager (N=16384, V=128256)",
               device="cuda"),
        Target("logprobs", dict(N=16384, V=128256, dtype="bfloat16"), "fwd", "", "floor_fraction", 0.8,
               "GPU: logprobs bf16 fwd >= 80% of HBM bandwidth (N=16384, V=128256)", device="cuda"),
    )

    def unavailable(self, impl, device):
        if impl == "trl_selective_log_softmax":
            if device.type != "cuda":
                return ("on CPU TRL's selective_log_softmax is the per-row loop already measured as "
                        "trl_selective_rows; its fused Triton path needs CUDA")
            fn, reason = B.trl_selective_log_softmax()
            return reason
        return None

    def setup(self, size, device):
        import torch
        n, v = int(size["N"]), int(size["V"])
        t = 1024 if n >= 1024 and n % 1024 == 0 else n
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = random_normal((n // t, t, v), device, _dtype(size["dtype"]), scale=2.0)
        labels = torch.randint(0, v, (n // t, t), generator=gen).to(device)
        logits.requires_grad_(True)
        return {"logits": logits, "labels": labels}

    def forward(self, impl, inp, state):
        logits, labels = inp["logits"], inp["labels"]
        if impl.startswith("rlfuse"):
            import rlfuse.kernels as K
            return K.logprobs_from_logits(logits, labels)
        if impl == "log_softmax_gather":
            return B.log_softmax_gather(logits, labels)
        if impl == "trl_selective_rows":
            return B.selective_log_softmax_rows(logits, labels)
        if impl == "chunked_torch":
            return B.chunked_logprobs(logits, labels)
        if impl == "trl_selective_log_softmax":
            fn, _ = B.trl_selective_log_softmax()
            return fn(logits, labels).float()
        raise KeyError(impl)

    def grad_targets(self, inp):
        return [inp["logits"]]

    def bytes_moved(self, size, mode):
        # forward: logits read once, int64 labels read, float32 log-probs written. fwd+bwd as an
        # autograd op: the backward reads the logits again (only the per-row logsumexp is saved)
        # and writes the [N, V] gradient, and reads labels + the incoming gradient.
        n, v, e = int(size["N"]), int(size["V"]), _itemsize(size["dtype"])
        rows = n * (8 + 4)
        return n * v * e + rows if mode == "fwd" else 3 * n * v * e + 2 * rows


def _itemsize(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype_name]


BENCH = LogprobsBench()


def test_logprobs(benchmark, bench_case):
    from .pytest_bridge import run_benchmark
    run_benchmark(benchmark, bench_case)
