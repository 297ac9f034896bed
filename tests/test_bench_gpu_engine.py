"""benchmarks/bench_gpu_engine.py (the GPU check's PPO-iteration benchmark) on CPU with the tiny
shape and no 4-bit: each layout runs one measured iteration and writes one JSON row that
``--summarize`` turns into a table."""

import json

import pytest

from rlfuse.benchmarks import bench_gpu_engine


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_tiny_ppo_iteration_writes_a_row(tmp_path, layout, capsys):
    out = tmp_path / "runs.jsonl"
    code = bench_gpu_engine.main(["--tiny", "--device", "cpu", "--backend", "torch", "--layout", layout,
                                  "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert code == 0, row
    assert row["status"] == "ok" and row["model"] == "tiny" and row["quant"] == "none"
    assert row["step_s"] > 0 and row["peak_gib"] > 0 and row["tokens"] > 0
    if layout == "shared":  # the engine's step reports its phases
        assert row["generate_tokens_per_s"] > 0
        assert row["generate_s"] + row["score_s"] + row["update_s"] <= row["step_s"] * 1.05
    capsys.readouterr()
    assert bench_gpu_engine.main(["--summarize", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"| tiny | {layout} | none | ok |" in table


def test_real_shapes_match_the_published_configs():
    one, eight = bench_gpu_engine.llama_config("llama-1b"), bench_gpu_engine.llama_config("llama-8b")
    assert (one.hidden_size, one.num_hidden_layers, one.vocab_size, one.tie_word_embeddings) == (2048, 16, 128256, True)
    assert (eight.hidden_size, eight.intermediate_size, eight.num_hidden_layers) == (4096, 14336, 32)


def test_a_failure_is_a_row_not_a_crash(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel\nsecond line of the message")

    monkeypatch.setattr(bench_gpu_engine, "build_base", broken)
    out = tmp_path / "runs.jsonl"
    code = bench_gpu_engine.main(["--tiny", "--device", "cpu", "--out", str(out)])
    row = json.loads(out.read_text())
    assert code == 1 and row["status"] == "error" and row["error"] == "RuntimeError: no such kernel"


def test_nf4_replaces_every_decoder_linear_and_keeps_the_function():
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    model = bench_gpu_engine.build_base("tiny", torch.device("cpu"), torch.float32, "none")
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    n = bench_gpu_engine.quantize_nf4_(model, torch.float32)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert n == 2 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)  # q k v o gate up down
    assert all(m.weight.dtype == torch.uint8 for m in linears)  # packed 4-bit, not a float copy
    assert type(model.lm_head) is torch.nn.Linear  # the LM head stays unquantized, as bnb loading does
    with torch.no_grad():
        out = model(input_ids=ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, rel  # NF4 rounding: changed, but the same function
