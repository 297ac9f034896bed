"""memory: peak memory of one PPO step on ONE shared backbone vs the usual FOUR separate models
(``rlfuse memory`` is this scenario). The step is the engine's own (``engine/memory.py``:
scoring without grad, then one PPO update), each layout in a fresh child of the one pool,
measured by the one meter (``PeakMeter``) from after a warm-up step on the tiny preset.

    rlfuse bench --scenarios memory [--sizes memory:model=tiny-small,batch_size=4,seq_len=128]
"""

from __future__ import annotations

from .spec import RunScenario


class MemoryScenario(RunScenario):
    """Peak memory of one PPO step: shared backbone (one base + LoRA adapters + heads) vs four
    separate models (policy, reference, reward, value), each in a fresh process; ratio
    shared/separate. CPU: peak RSS over the RSS after a warm-up step; CUDA: max_memory_allocated."""

    op = "memory"
    title = "One PPO step's peak memory: shared backbone vs four models"
    engines = ("shared", "separate")
    metrics = ("peak_mb",)
    plot_label = "peak memory (MiB)"
    repeats = 1
    timeout_s = 900
    _base = dict(model="tiny-small", batch_size=4, seq_len=128, quantization="auto")
    sizes_by_preset = {"quick": [dict(_base, batch_size=2, seq_len=64)], "full": [_base], "target": [_base]}

    def child(self, engine, size, ctx):
        import torch

        from rlfuse.engine.memory import measure

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return {"peak_mb": measure(engine, model=size["model"], device=device, batch_size=size["batch_size"],
                                   seq_len=size["seq_len"], quantization=size["quantization"]) / 2**20,
                "device": device}

    def finish(self, size, med):
        return {"shared_mb": med["shared"]["peak_mb"], "separate_mb": med["separate"]["peak_mb"],
                "ratio": med["shared"]["peak_mb"] / med["separate"]["peak_mb"]}

    def columns(self, res):
        s = res["size"]
        return [("model, batch x seq", f"{s['model']}, {s['batch_size']}x{s['seq_len']}"),
                ("shared MiB", f"{res['shared_mb']:.0f}"), ("separate MiB", f"{res['separate_mb']:.0f}"),
                ("shared/separate", f"**{res['ratio']:.2f}x**")]


BENCH = MemoryScenario()
