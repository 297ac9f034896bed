"""Data in through `datasets` (save_to_disk folders, parquet, arrow, csv, json) and TRL's formats."""

from __future__ import annotations

import pytest
from engine_helpers import FAST, WORDS, read_rows, write_jsonl

datasets = pytest.importorskip("datasets")

from rlfuse.engine import dataset_files  # noqa: E402
from rlfuse.engine.config import DataConfig  # noqa: E402
from rlfuse.engine.data import load_prompts, load_rankings, load_sft_dataset, read_jsonl  # noqa: E402
from rlfuse.engine.trl_formats import to_engine_record  # noqa: E402

SFT_ROWS = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in WORDS]
PREF_ROWS = [{"prompt": f"say {w}", "chosen": w, "rejected": "no"} for w in WORDS]


@pytest.fixture
def tok():
    from rlfuse.engine import tiny

    return tiny.build_tokenizer()


@pytest.fixture(autouse=True)
def default_options():
    dataset_files.configure(None)
    yield
    dataset_files.configure(None)


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- TRL formats

def test_trl_prompt_only_and_prompt_completion():
    assert to_engine_record({"prompt": [_user("hi")]}, "f:1") == {"messages": [_user("hi")]}
    assert to_engine_record({"prompt": "hi", "completion": "yo"}, "f:1") == {"prompt": "hi", "response": "yo"}
    assert to_engine_record({"prompt": [_user("hi")], "completion": [_bot("yo")]}, "f:1") == {
        "messages": [_user("hi"), _bot("yo")]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert to_engine_record(parts, "f:1") == {"messages": [_user("ab")]}
    engine_own = {"prompt": "x", "response": "y", "score": 1.0}
    assert to_engine_record(engine_own, "f:1") == engine_own


def test_trl_preference_explicit_and_implicit_prompt():
    conv = {"prompt": [_user("q")], "chosen": [_bot("good")], "rejected": [_bot("bad")]}
    assert to_engine_record(conv, "f:1") == {"messages": [_user("q")], "chosen": "good", "rejected": "bad"}
    implicit = {"chosen": [_user("q"), _bot("good")], "rejected": [_user("q"), _bot("bad")]}
    assert to_engine_record(implicit, "f:1") == {"messages": [_user("q")], "chosen": "good", "rejected": "bad"}
    text = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert to_engine_record(text, "f:1") == {"prompt": "The sky is", "chosen": "blue.", "rejected": "green."}
    with pytest.raises(ValueError, match="f:7: 'chosen' and 'rejected' share no prompt"):
        to_engine_record({"chosen": [_user("a"), _bot("x")], "rejected": [_user("b"), _bot("y")]}, "f:7")
    with pytest.raises(ValueError, match="f:2: 'chosen' must be one assistant message"):
        to_engine_record({"prompt": [_user("q")], "chosen": [_user("x"), _bot("y")], "rejected": [_bot("z")]}, "f:2")


def test_trl_conversational_jsonl_loads_like_the_engine_format(tmp_path, tok):
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"messages": [_user("q"), _bot("a")]}])
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [_user("q")], "completion": [_bot("a")]}])
    assert load_sft_dataset(ours, tok, 64) == load_sft_dataset(trl, tok, 64)


# --------------------------------------------------------------------------- files and folders

def test_every_file_format_reads_like_jsonl(tmp_path, tok):
    ref = load_sft_dataset(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), tok, 64)
    ds = datasets.Dataset.from_list(SFT_ROWS)
    ds.to_parquet(str(tmp_path / "sft.parquet"))
    ds.to_csv(str(tmp_path / "sft.csv"), index=False)
    ds.to_json(str(tmp_path / "sft.json"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in ("sft.parquet", "sft.csv", "sft.json", "saved", arrow):
        assert load_sft_dataset(tmp_path / path, tok, 64) == ref, path


def test_split_of_a_saved_dataset_dict(tmp_path, tok):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_ROWS[:3]),
                               "test": datasets.Dataset.from_list(SFT_ROWS[3:4])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_sft_dataset(tmp_path / "dd", tok, 64)) == 3  # default: train
    dataset_files.configure(DataConfig(split="test"))
    assert len(load_sft_dataset(tmp_path / "dd", tok, 64)) == 1
    dataset_files.configure(DataConfig(split="validation"))
    with pytest.raises(ValueError, match=r"no split 'validation' \(it has \['train', 'test'\]\)"):
        load_sft_dataset(tmp_path / "dd", tok, 64)


def test_column_mapping_and_its_errors(tmp_path, tok):
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in SFT_ROWS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    ref = load_sft_dataset(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), tok, 64)
    dataset_files.configure(DataConfig(prompt_column="question", response_column="answer"))
    assert load_sft_dataset(tmp_path / "qa.parquet", tok, 64) == ref
    # the same mapping applies to JSONL
    assert load_sft_dataset(write_jsonl(tmp_path / "qa.jsonl", rows), tok, 64) == ref
    dataset_files.configure(DataConfig(prompt_column="query"))
    with pytest.raises(ValueError, match=r"qa.parquet: no column 'query' \(set by data.prompt_column\); its columns"):
        load_sft_dataset(tmp_path / "qa.parquet", tok, 64)


def test_errors_name_file_and_row(tmp_path, tok):
    rows = [dict(r) for r in SFT_ROWS[:3]]
    rows[2]["response"] = None  # a parquet null
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet:row 2: expected \{'prompt', 'response'\}"):
        load_sft_dataset(tmp_path / "bad.parquet", tok, 64)
    datasets.Dataset.from_list([{"prompt": "p", "chosen": 3, "rejected": "x"}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match=r"p.parquet:row 0: .*'chosen'"):
        load_rankings(tmp_path / "p.parquet", tok, 64)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read it as a .parquet dataset"):
        read_jsonl(tmp_path / "junk.parquet")
    datasets.Dataset.from_list([{"prompt": "x"}]).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="empty.parquet: dataset is empty"):
        load_prompts(tmp_path / "empty.parquet", tok, 64)


# --------------------------------------------------------------------------- training end to end

def test_parquet_and_saved_folder_train_sft_and_the_reward_model(tmp_path, cli):
    datasets.Dataset.from_list(SFT_ROWS).to_parquet(str(tmp_path / "sft.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PREF_ROWS)}).save_to_disk(str(tmp_path / "prefs"))
    run = tmp_path / "run"
    common = [*FAST, "--run-dir", run, "--max-steps", 1]
    code, _, err = cli("sft", "--data", tmp_path / "sft.parquet", *common)
    assert code == 0, err
    code, _, err = cli("rm", "--data", tmp_path / "prefs", "--split", "train", *common)
    assert code == 0, err
    assert {r["stage"] for r in read_rows(run / "metrics.jsonl")} == {"sft", "rm"}


def test_conversational_preferences_and_mapped_columns_train(tmp_path, cli):
    rows = [{"question": [_user(f"say {w}")], "good": [_bot(w)], "bad": [_bot("no")]} for w in WORDS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "prefs.parquet"))
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": [_user(f"say {w}"), _bot(w)],
                                                          "rejected": [_user(f"say {w}"), _bot("no")]} for w in WORDS])
    code, _, err = cli("rm", "--data", tmp_path / "prefs.parquet", *FAST, "--run-dir", tmp_path / "a", "--max-steps", 1,
                       "--set", "data.prompt_column=question", "--set", "data.chosen_column=good",
                       "--set", "data.rejected_column=bad")
    assert code == 0, err
    code, _, err = cli("rm", "--data", implicit, *FAST, "--run-dir", tmp_path / "b", "--max-steps", 1)
    assert code == 0, err
    assert [r["stage"] for r in read_rows(tmp_path / "b" / "metrics.jsonl")] == ["rm"]
