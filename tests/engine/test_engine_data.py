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


# --------------------------------------------------------------------------- issue 15: bad bytes and numbers

import logging  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_name_file_and_line(tmp_path, tok, number):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "a", "response": "b", "score": 1}\n'
                 f'{{"prompt": "a", "response": "c", "score": {number}}}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: non-finite number"):
        load_reward_dataset(p, tok, 64)
    p.write_text(f'{{"prompt": "a", "responses": ["x", "y"], "ranks": [1, 2], "weight": [{number}]}}\n')
    with pytest.raises(ValueError, match=rf"{p}:1: non-finite number"):  # any field, any format
        read_jsonl(p)


def test_invalid_utf8_names_file_and_line_and_bom_is_accepted(tmp_path, tok):
    p = tmp_path / "sft.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"}).encode()
    p.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: not valid UTF-8 \(byte 0xe9"):
        read_jsonl(p)
    p.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert [r for _, r in read_jsonl(p)] == [{"prompt": "a", "response": "b"}]


def test_overlong_examples_are_counted_in_a_warning(tmp_path, tok, caplog):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "q", "response": "a b c d e f g h i j k l"}) + "\n"
                 + json.dumps({"prompt": "x " * 40, "response": "y"}) + "\n"
                 + json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="rlfuse.data"):
        examples = load_sft_dataset(p, tok, 16)
    assert len(examples) == 2
    assert "2 example(s) longer than sft.max_length=16" in caplog.text and "1 of them kept no response" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlfuse.data"):
        load_prompts(p, tok, 8)
    assert "prompt(s) longer than ppo.max_prompt_length=8" in caplog.text


def test_identical_chosen_and_rejected_are_dropped_with_a_warning(tmp_path, tok, caplog):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="rlfuse.data"):
        pairs, _ = load_reward_dataset(p, tok, 64)
    assert len(pairs) == 1 and "dropped 1 pair(s) whose chosen and rejected texts are identical" in caplog.text


def test_missing_dataset_hint_names_the_verbs_flag(tok):
    with pytest.raises(ValueError, match="--prompts prompts.jsonl"):
        load_prompts(None, tok, 64)
    with pytest.raises(ValueError, match="--data sft.jsonl"):
        load_sft_dataset(None, tok, 64)


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                     lambda inner: (st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)


_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x", 3]),
                                             "content": st.one_of(st.text(max_size=6), st.none())}), max_size=3)
_RECORD = st.dictionaries(st.sampled_from(["prompt", "response", "chosen", "rejected", "score", "messages", "system"]),
                          st.one_of(_JSON, _MESSAGES), max_size=5)  # near-valid lines reach the deeper checks


def _line(value) -> bytes:
    return json.dumps(value).encode()  # json.dumps writes NaN / Infinity for non-finite floats


@settings(max_examples=300, deadline=None, database=None)
@given(lines=st.lists(st.one_of(_RECORD.map(_line), _JSON.map(_line), st.binary(max_size=20)), min_size=1, max_size=4),
       loader=st.sampled_from(["read", "sft", "rm", "prompts"]))
def test_random_jsonl_raises_valueerror_naming_the_file(tmp_path_factory, tok, lines, loader):
    p = tmp_path_factory.mktemp("d") / "x.jsonl"
    p.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    load = {"read": read_jsonl, "sft": lambda q: load_sft_dataset(q, tok, 32),
            "rm": lambda q: load_reward_dataset(q, tok, 32), "prompts": lambda q: load_prompts(q, tok, 32)}[loader]
    try:
        load(p)
    except ValueError as exc:
        assert str(p) in str(exc) or "chat template" in str(exc)
