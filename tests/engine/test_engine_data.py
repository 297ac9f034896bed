import json

import pytest

from rlfuse.engine.data import epoch_batches, load_prompts, load_reward_dataset, load_sft_dataset, read_jsonl
from rlfuse.engine.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(ValueError, match=rf"{p}:3: malformed JSON"):
        read_jsonl(p)


def test_missing_fields_name_file_and_line(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: expected"):
        load_sft_dataset(p, tok, 64)
    p.write_text('{"prompt": "a", "chosen": 3, "rejected": "x"}\n')
    with pytest.raises(ValueError, match=rf"{p}:1: field 'chosen' must be a string"):
        load_reward_dataset(p, tok, 64)


def test_empty_and_missing(tmp_path, tok):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_sft_dataset(p, tok, 64)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl", tok, 64)


def test_sft_loss_mask_covers_assistant_tokens_only(tmp_path, tok):
    p = tmp_path / "sft.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    p.write_text(json.dumps({"prompt": "Q", "response": "AB"}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    ex1, ex2 = load_sft_dataset(p, tok, 512)
    # the template renders <|user|>Q</s><|assistant|>AB</s>: loss on "AB</s>" only
    assert tok.decode(ex1.input_ids) == "<|user|>Q</s><|assistant|>AB</s>"
    assert tok.decode([t for t, m in zip(ex1.input_ids, ex1.loss_mask) if m]) == "AB</s>"
    assert tok.decode([t for t, m in zip(ex2.input_ids, ex2.loss_mask) if m]) == "yo</s>ok</s>"
    assert tok.decode(ex2.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_prompts_and_ratings(tmp_path, tok):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "drop me"}]}) + "\n"
                 + json.dumps({"prompt": "x", "response": "y", "score": 2}) + "\n")
    prompts = load_prompts(p, tok, 64)
    assert prompts[0].raw == "hi" and prompts[0].text == "<|user|>hi</s><|assistant|>"
    assert tok.decode(prompts[0].input_ids) == prompts[0].text
    r = tmp_path / "r.jsonl"
    r.write_text(json.dumps({"prompt": "x", "response": "y", "score": 2}) + "\n")
    pairs, ratings = load_reward_dataset(r, tok, 64)
    assert not pairs and ratings[0].score == 2.0
    assert tok.decode(ratings[0].input_ids).endswith("<|assistant|>y</s>")


def test_epoch_batches_cover_each_example_once_per_epoch():
    seen = sorted(i for step in range(3) for i in epoch_batches(10, 4, seed=0, step=step))
    assert seen == list(range(10))
    assert epoch_batches(10, 4, 0, 5) == epoch_batches(10, 4, 0, 5)  # any step is reproducible
