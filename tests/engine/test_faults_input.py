"""Issue 21, odd-text and seed group: lone surrogates in data files and out-of-range seeds end in
one line naming the problem (exit 2), before any model loads or anything is written."""

from __future__ import annotations

import json

import pytest
from engine_helpers import FAST, one_line_error

from rlfuse.engine.data import read_jsonl
from rlfuse.engine.textcheck import find_lone_surrogate


# --------------------------------------------------------------------------- lone surrogates

def test_find_lone_surrogate():
    assert find_lone_surrogate("plain ascii and \U0001F600 and é") is None
    assert find_lone_surrogate({"a": ["ok", {"b": "x\ud83d"}]}) == "field 'a[1].b' (\\ud83d at character 2)"
    assert find_lone_surrogate({"\udc00": 1}).startswith("a field name")
    assert find_lone_surrogate([1, 2.0, None, True]) is None


@pytest.mark.parametrize("record,field", [
    ({"prompt": "say \ud83d", "response": "ok"}, "prompt"),
    ({"prompt": "p", "response": "\udfff tail"}, "response"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\ud800b"}]},
     "messages[1].content"),
])
def test_data_line_with_lone_surrogate_names_file_and_line(tmp_path, record, field):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "response": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as info:
        read_jsonl(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: ") and "lone surrogate" in msg and field in msg, msg


def test_sft_with_lone_surrogate_is_one_line(tmp_path, cli):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n"
                    + json.dumps({"prompt": "emoji cut \ud83d in half", "response": "y"}) + "\n")
    code, _, err = cli("sft", "--data", data, "--run-dir", tmp_path / "run", *FAST)
    one_line_error(code, err, "sft.jsonl:2", "lone surrogate")


# --------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("seed", ["1733312345123456789", "18446744073709551616", "-1", "4294967296"])
def test_out_of_range_seed_is_refused_before_anything(tmp_path, cli, data, seed):
    run = tmp_path / "run"
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", run, "--seed", seed, *FAST)
    one_line_error(code, err, "'seed'", "4294967295", seed)
    assert not run.exists()  # refused before the run directory was made


def test_seed_through_set_is_checked_too(tmp_path, cli, data):
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--set", "seed=99999999999", *FAST)
    one_line_error(code, err, "'seed'")


def test_largest_seed_trains(tmp_path, cli, data):
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--seed", str(2**32 - 1),
                       "--max-steps", "1", *FAST)
    assert code == 0, err


# --------------------------------------------------------------------------- damaged model inputs

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny preset saved as a Hugging Face model directory (tokenizer + safetensors)."""
    from rlfuse.engine import tiny

    d = tmp_path_factory.mktemp("model")
    tok = tiny.build_tokenizer()
    tiny.build_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _damage_only_config(d):
    for p in d.iterdir():
        if p.name != "config.json":
            p.unlink()


def _damage_truncated_weights(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _damage_cut_header(d):
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:20])


def _damage_missing_shard(d):
    w = d / "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    w.rename(d / "model-00001-of-00002.safetensors")


def _damage_truncated_tokenizer(d):
    t = d / "tokenizer.json"
    t.write_bytes(t.read_bytes()[:100])


def _damage_no_weights(d):
    (d / "model.safetensors").unlink()


@pytest.mark.parametrize("damage,words", [
    (_damage_only_config, ["no tokenizer files", "fetch the model again"]),
    (_damage_truncated_weights, ["model.safetensors is truncated", "bytes where its header needs"]),
    (_damage_cut_header, ["model.safetensors is truncated", "header"]),
    (_damage_missing_shard, ["lacks model-00002-of-00002.safetensors"]),
    (_damage_truncated_tokenizer, ["tokenizer.json is truncated"]),
    (_damage_no_weights, ["has no weights"]),
])
def test_damaged_model_directory_names_the_file(cli, data, tmp_path, model_dir, damage, words):
    d = _copy(model_dir, tmp_path / "model")
    damage(d)
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--model", d, *FAST[:3])
    one_line_error(code, err, *words)


def test_whole_model_directory_passes_the_checks(model_dir):
    from rlfuse.engine.model_files import check_model_dir

    check_model_dir(model_dir)  # no false alarm on a complete save_pretrained folder


def _tiny_gguf(path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.add_tensor("output.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.9, 40, 3])
def test_truncated_gguf_names_the_file(cli, data, tmp_path, keep):
    path = _tiny_gguf(tmp_path / "model.gguf")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--model", path, *FAST[:3])
    one_line_error(code, err, "model.gguf", "fetch the model again")


def test_whole_gguf_passes_the_check(tmp_path):
    from rlfuse.engine.model_files import check_gguf

    check_gguf(_tiny_gguf(tmp_path / "model.gguf"))


def test_not_a_gguf(cli, data, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>404 not found</html>")
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--model", path, *FAST[:3])
    one_line_error(code, err, "not a GGUF file")


# --------------------------------------------------------------------------- a garbage `latest` pointer

@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00\x80\x81binary", b"", b"../../etc", b"ckpt-9999999"])
def test_garbage_latest_falls_back_like_a_truncated_checkpoint(cli, data, tmp_path, garbage):
    from engine_helpers import read_rows

    run = tmp_path / "run"
    args = ["sft", "--data", data["sft"], "--run-dir", run, *FAST, "--set", "save_every=2"]
    code, _, err = cli(*args, "--max-steps", 4)
    assert code == 0, err
    (run / "sft" / "latest").write_bytes(garbage)
    code, out, err = cli(*args, "--max-steps", 6, "--resume")
    assert code == 0, err
    assert "which is missing or incomplete; using ckpt-0000004" in out
    assert "resuming sft from" in out and "(step 4)" in out
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
