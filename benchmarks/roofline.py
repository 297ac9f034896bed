"""The roofline floor of a benchmark row: how close an op runs to what the machine allows.

Each op's spec says how many bytes it must move at a size and mode (``OpBench.bytes_moved``:
every input read and every output written the fewest times its contract allows) and, for the
fused LM head, how many FLOPs it must do (``OpBench.flops``). The floor is those bytes over the
bandwidth of a large copy measured in the same process (read + write counted, like the op's
bytes), timed interleaved with the ops (median, like theirs) so load on a shared machine
hits both alike; ``floor_fraction = floor_s / time_s`` is 1.0 for an op at copy speed. On a
GPU the matrix work is also set against the tensor cores' dense bf16 peak from the datasheet
(a reading of the copy is cheap and honest; a datasheet FLOP rate is what the issue asks for).
"""

from __future__ import annotations

import time

_BANDWIDTH: dict[str, float] = {}

# dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets, no sparsity); most specific name first
TENSOR_CORE_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def copy_bandwidth(device, *, refresh: bool = False) -> float:
    """GB/s of a large copy on ``device`` (bytes read + bytes written), the best seen in this
    process: a later ``refresh=True`` reading replaces it only when faster, so a moment of
    load on a shared machine does not lower the ceiling."""
    import torch

    device = torch.device(device)
    key = str(device)
    if key in _BANDWIDTH and not refresh:
        return _BANDWIDTH[key]
    measured = _cuda_copy(device) if device.type == "cuda" else _cpu_copy()
    _BANDWIDTH[key] = max(measured, _BANDWIDTH.get(key, 0.0))
    return _BANDWIDTH[key]


def _cuda_copy(device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * nbytes / seconds / 1e9


def _cpu_copy(nbytes: int = 128 << 20, reps: int = 7) -> float:
    # 128 MiB: well past any CPU's last-level cache; torch's copy_ runs on torch's threads,
    # the same threads the ops get. Best of ``reps``: the ceiling, not the average under load.
    import torch
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages: first-touch faults are not bandwidth
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


class CopyProbe:
    """A large copy to time beside the ops (``measure.measure_time_group`` interleaves it with
    them), so load on a shared machine slows the floor's bandwidth and the ops alike."""

    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        self.nbytes = (1 << 30) if self.device.type == "cuda" else (128 << 20)
        self.src = torch.ones(self.nbytes // 4, dtype=torch.float32, device=self.device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # touch the pages: first-touch faults are not bandwidth

    def __call__(self):
        self.dst.copy_(self.src)

    def gbps(self, seconds: float) -> float:
        """Bandwidth of one copy that took ``seconds`` (read + write)."""
        return 2 * self.nbytes / seconds / 1e9


def tensor_core_peak(device) -> float | None:
    """Dense bf16 FLOP/s of ``device``'s tensor cores from the datasheet table (None: unknown or CPU)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in TENSOR_CORE_PEAK:
        if key in name:
            return peak
    return None


def annotate(bench, size: dict, mode: str, time_s: float, device, bandwidth_gbps: float | None = None) -> dict:
    """The roofline fields of one timed (op, size, mode): bytes_moved, copy_gbps, floor_s,
    floor_fraction, achieved_gbps; with FLOPs, achieved_tflops and (GPU, 16-bit inputs)
    tensor_core_fraction. Empty when the op declares no floor. ``bandwidth_gbps``: a copy
    timed beside the op (:class:`CopyProbe`); else this process's best :func:`copy_bandwidth`."""
    nbytes = bench.bytes_moved(size, mode)
    out: dict = {}
    if nbytes and time_s > 0:
        bw = bandwidth_gbps or copy_bandwidth(device)
        floor_s = nbytes / (bw * 1e9)
        out.update(bytes_moved=int(nbytes), copy_gbps=round(bw, 2), floor_s=floor_s,
                   floor_fraction=floor_s / time_s, achieved_gbps=nbytes / time_s / 1e9)
    flops = bench.flops(size, mode)
    if flops and time_s > 0:
        out["achieved_tflops"] = flops / time_s / 1e12
        peak = tensor_core_peak(device)
        if peak and str(size.get("dtype", "")) in ("bfloat16", "float16"):
            out["tensor_core_fraction"] = flops / time_s / peak
    return out


# --------------------------------------------------------------------------- the step's matmul floor

class MatmulFloor:
    """The floor of a whole run: its weight matmuls alone, at the run's own shapes.

    ``with MatmulFloor(model, ...) as mf: run()`` counts, for every frozen base ``nn.Linear`` of
    the models (LoRA's own small matrices and scalar heads left out) and for the LM head applied
    through ``K.linear_logprobs``, how many calls saw how many rows, forward and backward (the
    input gradient dX = dY W, counted when the input needs one; the base weights get no gradient).
    ``floor()`` then times each (weight, rows) once more with ``F.linear`` on the real weights, in
    model order (so weights stream from memory as in the run), best of three, and returns the
    summed seconds and GFLOP. Attention scores, softmax, norms, optimiser, sampling and Python are
    left out: it is the least time the run's matmuls need on this machine."""

    def __init__(self, *models):
        import torch
        self.mods = [m for model in models for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lora_" not in n and m.out_features > 1]
        self.calls: dict[tuple, int] = {}  # (module index or weight id, in, rows) -> calls (fwd + bwd)
        self.head_weights: dict[int, object] = {}
        self._handles, self._orig = [], None

    def _count(self, key, n=1):
        self.calls[key] = self.calls.get(key, 0) + n

    def __enter__(self):
        import rlfuse.kernels as K

        def hook(mod, inp, out, i=None):
            x = inp[0]
            rows = x.numel() // max(1, x.shape[-1])
            self._count((i, rows))
            if x.requires_grad and out.requires_grad:
                out.register_hook(lambda g, k=(i, rows): self._count(k))

        for i, m in enumerate(self.mods):
            self._handles.append(m.register_forward_hook(lambda mod, inp, out, i=i: hook(mod, inp, out, i)))
        self._orig = K.linear_logprobs

        def counted(hidden, weight, labels, *a, **kw):
            self.head_weights[id(weight)] = weight
            rows = hidden.numel() // max(1, hidden.shape[-1])
            self._count((f"w{id(weight)}", rows), 2 if hidden.requires_grad else 1)
            return self._orig(hidden, weight, labels, *a, **kw)

        K.linear_logprobs = counted
        return self

    def __exit__(self, *exc):
        import rlfuse.kernels as K
        for h in self._handles:
            h.remove()
        K.linear_logprobs = self._orig
        return False

    def floor(self, scale: float = 1.0) -> dict:
        """{"gflop", "floor_s"} of everything counted, times ``scale`` (e.g. 1 / steps)."""
        import time

        import torch
        import torch.nn.functional as F

        weights = {i: m.weight for i, m in enumerate(self.mods)}
        weights.update({f"w{k}": w for k, w in self.head_weights.items()})
        by_rows: dict[int, list] = {}
        for (key, rows), n in self.calls.items():
            by_rows.setdefault(rows, []).append((key, n))
        seconds = gflop = 0.0
        with torch.no_grad():
            for rows, items in sorted(by_rows.items()):
                items.sort(key=lambda kn: (isinstance(kn[0], str), kn[0] if isinstance(kn[0], int) else 0))
                xs = {}
                best = {}
                for rep in range(3):
                    for key, _n in items:
                        w = weights[key].detach()
                        x = xs.get((w.shape[1], w.dtype))
                        if x is None:
                            x = xs[w.shape[1], w.dtype] = torch.randn(rows, w.shape[1], dtype=w.dtype,
                                                                      device=w.device)
                        t0 = time.perf_counter()
                        F.linear(x, w)
                        if w.device.type == "cuda":
                            torch.cuda.synchronize(w.device)
                        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
                    if rep == 0 and sum(best.values()) > 2.0:  # a long pass: one reading is enough
                        break
                for key, n in items:
                    seconds += n * best[key]
                    gflop += n * 2.0 * rows * weights[key].numel() / 1e9
        return {"gflop": gflop * scale, "floor_s": seconds * scale}
