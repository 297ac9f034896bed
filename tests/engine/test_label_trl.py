"""``rlfuse label export --format trl`` writes one TRL format per file, and TRL trains on it:
loaded with ``datasets`` and one ``RewardTrainer`` step on a tiny random model (issue 25)."""

from __future__ import annotations

import json

import pytest
from engine_helpers import read_rows, write_jsonl


def _label(task_id, prompt, responses, ranks, **kw):
    return {"task_id": task_id, "annotator": "ann", "prompt": prompt, "responses": responses, "ranks": ranks,
            "skipped": False, "shown_order": list(range(len(responses))), "seconds": 1.0, **kw}


MIXED = [_label("t0", "What is 6*7?", ["42", "41", "forty-two"], [1, 3, 2], system="Answer with a number."),
         _label("t1", "What is 2+2?", ["4", "22"], [1, 2]),
         _label("t2", "Name a colour.", ["red", "7"], [1, 2])]


def test_mixed_system_messages_export_one_conversational_format_trl_loads(tmp_path, cli):
    datasets = pytest.importorskip("datasets")
    labels = write_jsonl(tmp_path / "labels.jsonl", MIXED)
    out = tmp_path / "trl.jsonl"
    code, stdout, err = cli("label", "export", labels, "--format", "trl", "--out", out)
    assert code == 0, err
    assert json.loads(stdout)["trl_style"] == "conversational"  # a task has a system message
    rows = read_rows(out)
    assert all(isinstance(r["prompt"], list) and isinstance(r["chosen"], list) for r in rows)
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Answer with a number."}
    assert rows[-1]["prompt"] == [{"role": "user", "content": "Name a colour."}]  # no system turn invented

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.features["chosen"].feature["content"].dtype == "string"  # not generic JSON
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "42"}]  # a string, not the integer 42
    assert ds[len(ds) - 1]["rejected"][0]["content"] == "7"


def test_trl_style_standard_and_its_refusal(tmp_path, cli):
    labels = write_jsonl(tmp_path / "labels.jsonl", MIXED[1:])
    out = tmp_path / "trl.jsonl"
    code, stdout, err = cli("label", "export", labels, "--format", "trl", "--out", out)
    assert code == 0 and json.loads(stdout)["trl_style"] == "standard", err  # no system message anywhere
    assert read_rows(out) == [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "22"},
                              {"prompt": "Name a colour.", "chosen": "red", "rejected": "7"}]
    assert cli("label", "export", labels, "--format", "trl", "--trl-style", "conversational", "--out", out)[0] == 0
    assert read_rows(out)[0]["chosen"] == [{"role": "assistant", "content": "4"}]

    mixed = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    code, _, err = cli("label", "export", mixed, "--format", "trl", "--trl-style", "standard", "--out", out)
    assert code == 2 and "system message" in err and "t0" in err and "conversational" in err, err


def test_reward_trainer_trains_one_step_on_the_export(tmp_path, cli):
    datasets = pytest.importorskip("datasets")
    try:
        from trl import RewardConfig, RewardTrainer
    except ImportError as exc:
        pytest.skip(f"TRL is not installed (pip install -e '.[peers]'): {exc}")
    import torch
    from transformers import LlamaForSequenceClassification

    from rlfuse.engine.tiny import build_config, build_tokenizer

    labels = write_jsonl(tmp_path / "labels.jsonl", MIXED)
    out = tmp_path / "trl.jsonl"
    assert cli("label", "export", labels, "--format", "trl", "--margin", "--out", out)[0] == 0
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(build_config(len(tok), num_labels=1))
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=len(ds),
                        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    before = [p.detach().clone() for p in model.parameters()]
    result = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it took a step
