"""linear_logprobs: the fused LM head, log p(label) from hidden states and the [V, H]
output-embedding matrix without the [N, V] logits.

rlfuse (``K.linear_logprobs``) against
  * matmul_log_softmax_gather - ``(hidden @ W.T).log_softmax(-1).gather(...)``, what
                                ``model(...).logits`` + log-prob extraction costs;
  * chunked_torch_verl        - verl's fused-linear-for-PPO recipe in PyTorch: token chunks
                                under no_grad, recompute + autograd per chunk in backward;
  * trl_chunked_logprob (peer) - ``trl.kernels.ChunkedLogProbFunction`` with TRL's own
                                vocabulary tile (Triton on GPU, TRL's torch fallback on CPU);
  * torch_compile_chunked (peer) - ``torch.compile`` of a chunked linear log-prob (1024-token
                                chunks, logits recomputed in backward; PyTorch issue #124480);
  * liger_flce (peer, CUDA)    - Liger-Kernel's fused linear cross-entropy, reduction="none".

fwd is the scoring path (no_grad); fwd+bwd back-propagates sum(logp) into hidden and W.
"""

from __future__ import annotations

from . import baselines as B
from .spec import GB, OpBench, Target, random_normal


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class LinearLogprobsBench(OpBench):
    op = "linear_logprobs"
    title = "linear_logprobs (hidden, W -> log p(label), fused LM head)"
    baselines = ("matmul_log_softmax_gather", "chunked_torch_verl")
    peers = ("trl_chunked_logprob", "torch_compile_chunked", "liger_flce")
    x_key = "N"
    x_label = "tokens N (x hidden H x vocab V)"
    descriptions = {
        "rlfuse": "rlfuse.kernels.linear_logprobs",
        "matmul_log_softmax_gather": "(hidden @ W.T).log_softmax(-1).gather(-1, labels)",
        "chunked_torch_verl": "verl-style chunked LM head: no_grad chunks forward, recompute per chunk in backward",
        "trl_chunked_logprob": "trl.kernels.ChunkedLogProbFunction (TRL's vocab tile; Triton on GPU)",
        "torch_compile_chunked": "torch.compile (Inductor) of 1024-token chunks: matmul + logsumexp + gather, "
                                 "logits recomputed in a compiled backward; compile time excluded",
        "liger_flce": "Liger-Kernel LigerFusedLinearCrossEntropyFunction, reduction='none' (CUDA only)",
    }
    sizes_by_preset = {
        "target": [dict(N=4096, H=64, V=32768, dtype="float32")],
        "quick": [dict(N=512, H=64, V=32768, dtype="float32"), dict(N=1024, H=128, V=32768, dtype="float32")],
        "full": [dict(N=1024, H=64, V=32768, dtype="float32"), dict(N=4096, H=64, V=32768, dtype="float32"),
                 dict(N=2048, H=256, V=65536, dtype="float32")],
        "gpu": [dict(N=4096, H=4096, V=128256, dtype="bfloat16"), dict(N=16384, H=4096, V=128256, dtype="bfloat16")],
    }
    _target = dict(N=4096, H=64, V=32768, dtype="float32")
    _gpu_target = dict(N=16384, H=4096, V=128256, dtype="bfloat16")
    targets = (
        Target("linear_logprobs", _target, "fwd+bwd", "matmul_log_softmax_gather", "memory_fraction", 0.1,
               "linear_logprobs fwd+bwd peak extra memory <= 1/10 of matmul+log_softmax+gather (N=4096, H=64, V=32768)"),
        Target("linear_logprobs", _target, "fwd+bwd", "matmul_log_softmax_gather", "time_within", 1.3,
               "linear_logprobs fwd+bwd time within 1.3x of matmul+log_softmax+gather"),
        Target("linear_logprobs", _gpu_target, "fwd+bwd", "matmul_log_softmax_gather", "memory_fraction", 0.1,
               "GPU: linear_logprobs bf16 fwd+bwd peak extra <= 1/10 of unfused (N=16384, H=4096, V=128256)",
               device="cuda"),
        Target("linear_logprobs", _gpu_target, "fwd+bwd", "liger_flce", "speedup", 1.0,
               "GPU: linear_logprobs bf16 fwd+bwd vs Liger FLCE (Liger's published SM90 figure: 104.8 ms)",
               device="cuda"),
        Target("linear_logprobs", _gpu_target, "fwd+bwd", "", "max_time", 0.100,
               "GPU: linear_logprobs bf16 fwd+bwd <= 100 ms (N=16384, H=4096, V=128256)", device="cuda"),
        Target("linear_logprobs", _gpu_target, "fwd+bwd", "", "max_extra_memory", 1e9,
               "GPU: linear_logprobs bf16 fwd+bwd <= 1 GB extra beyond the weight gradient", device="cuda",
               allowance_bytes=128256 * 4096 * 2),
    )

    def unavailable(self, impl, device):
        if impl == "trl_chunked_logprob":
            return B.trl_chunked_logprob()[1]
        if impl == "torch_compile_chunked":
            return B.compile_unavailable(device)
        if impl == "liger_flce":
            if device.type != "cuda":
                return B.LIGER_CPU_REASON
            return B.liger_flce()[1]
        return None

    def setup(self, size, device):
        import torch
        n, h, v = int(size["N"]), int(size["H"]), int(size["V"])
        dt = _dtype(size["dtype"])
        gen = torch.Generator(device="cpu").manual_seed(0)
        hidden = random_normal((n, h), device, dt, seed=1).requires_grad_(True)
        weight = random_normal((v, h), device, dt, seed=2, scale=(1.0 / h) ** 0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=gen).to(device)
        return {"hidden": hidden, "weight": weight, "labels": labels}

    def forward(self, impl, inp, state):
        h, w, y = inp["hidden"], inp["weight"], inp["labels"]
        if impl.startswith("rlfuse"):
            import rlfuse.kernels as K
            return K.linear_logprobs(h, w, y)
        if impl == "matmul_log_softmax_gather":
            return B.linear_log_softmax_gather(h, w, y)
        if impl == "chunked_torch_verl":
            return B.chunked_linear_logprobs(h, w, y)
        if impl == "trl_chunked_logprob":
            return B.trl_linear_logprobs(h, w, y)
        if impl == "torch_compile_chunked":
            return B.compiled_chunked_linear_logprobs(h, w, y)
        if impl == "liger_flce":
            return B.liger_linear_logprobs(h, w, y)
        raise KeyError(impl)

    def grad_targets(self, inp):
        return [inp["hidden"], inp["weight"]]

    def bytes_moved(self, size, mode):
        # forward: hidden [N, H] and W [V, H] read once, labels read, log-probs written. fwd+bwd
        # as an autograd op: the backward reads hidden and W again and writes both gradients.
        n, h, v, e = int(size["N"]), int(size["H"]), int(size["V"]), _itemsize(size["dtype"])
        rows = n * (8 + 4)
        return (n * h + v * h) * e + rows if mode == "fwd" else 3 * (n * h + v * h) * e + 2 * rows

    def flops(self, size, mode):
        # the logits matmul (2NHV); the backward adds dH = dZ W and dW = dZ^T H (4NHV). A kernel
        # that recomputes the logits in its backward does 8NHV: the extra 2NHV is its own choice.
        n, h, v = int(size["N"]), int(size["H"]), int(size["V"])
        return 2.0 * n * h * v * (1 if mode == "fwd" else 3)


def _itemsize(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype_name]


BENCH = LinearLogprobsBench()


def test_linear_logprobs(benchmark, bench_case):
    from .pytest_bridge import run_benchmark
    run_benchmark(benchmark, bench_case)
