"""The reward model reads a (prompt, response) at the SAME token, with the same tokens, when it
is trained (``load_reward_dataset``), when PPO scores a rollout (``score_rollout``) and when the
demo scores evaluations (``reward_model_scores``).

Regression: training used to read the template's full rendering (for ChatML: the newline
AFTER ``<|im_end|>``) while PPO read the rollout at ``<|im_end|>`` (and mid-answer for a
completion cut at max_new_tokens), so PPO optimised a score the model was never trained on.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.config import ModelConfig
from rlfuse.engine.data import load_prompts, load_reward_dataset, pad, reward_ids
from rlfuse.engine.rollout import Rollout, score_rollout

SYSTEM = "Answer briefly."
CASES = [("What's 4-2 and 3-1?", "4-2 = 2 and 3-1 = 2."),
         ("say sun", "sun"),
         ("What's 9+8 and 6-0?", "9+8 = 17 and 6-0 = 5."),
         ("a much longer prompt, so that the left padding differs", "ok")]


# ChatML's shape: every turn closes with the EOS and then a newline, so the template's full
# rendering of a chat ends one token AFTER the EOS a rollout stops on (the original bug)
CHATML_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _reward_backbone(template=None):
    torch.manual_seed(0)
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy", "reward"])
    if template is not None:
        bb.tokenizer.chat_template = template
    with torch.no_grad():  # a reward adapter that does something (LoRA B starts at zero)
        for p in bb.adapter_parameters("reward"):
            p.normal_(0.0, 0.2)
    bb.reference_adapter = None
    return bb


def _rollout(bb, prompts, responses, truncate_at: int | None = None) -> Rollout:
    """A batch laid out exactly as ``generate_rollout`` lays out sampled completions:
    left-padded prompts, completion + EOS, right padding after it; a completion longer than
    ``truncate_at`` tokens is cut there with no EOS (it hit max_new_tokens)."""
    tok = bb.tokenizer
    eos = tok.eos_token_id
    comps = []
    for r in responses:
        ids = tok(r, add_special_tokens=False)["input_ids"]
        comps.append(ids[:truncate_at] if truncate_at is not None and len(ids) >= truncate_at else ids + [eos])
    R = max(len(c) for c in comps)
    p_ids, p_attn = pad([p.input_ids for p in prompts], tok.pad_token_id, side="left")
    c_ids, c_mask = pad(comps, tok.pad_token_id, side="right")
    assert R == c_ids.shape[1]
    return Rollout(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_attn, c_mask], 1),
                   prompt_len=p_ids.shape[1], response_mask=c_mask.float(), prompts=[p.raw for p in prompts],
                   completions=list(responses))


def _training_scores(bb, path, max_length=256):
    pairs, _ = load_reward_dataset(path, bb.tokenizer, max_length)
    # exactly as train_reward / pairwise_accuracy batch them: chosen then rejected, right-padded
    ids, attn = pad([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], bb.tokenizer.pad_token_id)
    with torch.no_grad():
        s = bb.reward_scores(ids, attn)
    return pairs, s[: len(pairs)], s[len(pairs):]


@pytest.mark.parametrize("template", [None, CHATML_LIKE], ids=["tiny-template", "chatml-like"])
def test_rm_scores_match_between_training_and_ppo_scoring(tmp_path, template):
    bb = _reward_backbone(template)
    bb.train(False)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"system": SYSTEM, "prompt": p, "chosen": r, "rejected": "no idea"}) + "\n"
                             for p, r in CASES))
    pairs, chosen, rejected = _training_scores(bb, prefs)
    eos = bb.tokenizer.eos_token_id
    assert all(p.chosen_ids[-1] == eos for p in pairs)  # read at the EOS that closes the answer

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"system": SYSTEM, "prompt": p}) + "\n" for p, _ in CASES))
    prompts = load_prompts(prompts_file, bb.tokenizer, 256)
    # the same token ids, laid out as PPO lays them out
    for pr, pair, (_, r) in zip(prompts, pairs, CASES):
        assert pair.chosen_ids == pr.input_ids + bb.tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]

    ro = score_rollout(bb, _rollout(bb, prompts, [r for _, r in CASES]), with_values=False, batch_size=3)
    torch.testing.assert_close(ro.scores, chosen.float(), rtol=1e-4, atol=1e-5)
    ro = score_rollout(bb, _rollout(bb, prompts, ["no idea"] * len(CASES)), with_values=False)
    torch.testing.assert_close(ro.scores, rejected.float(), rtol=1e-4, atol=1e-5)

    # the demo's evaluation uses the same layout: its stage files are these {"system", "prompt"}
    # rows (read by load_prompts), and its evaluator scores with rollout.score, checked above
    from rlfuse.engine import evaluate, rollout
    from rlfuse.engine.demo import task

    splits = task.Splits(heldout=[], sft=[], annotate=[], synthetic=[], ppo=[p for p, _ in CASES])
    files = task.write_stage_data(tmp_path / "demo", splits, SYSTEM)
    demo_prompts = load_prompts(files["ppo"], bb.tokenizer, 256)
    assert [p.input_ids for p in demo_prompts] == [p.input_ids for p in prompts]
    assert evaluate.score is rollout.score and evaluate.sample_completions is rollout.sample_completions


@pytest.mark.parametrize("template", [None, CHATML_LIKE], ids=["tiny-template", "chatml-like"])
def test_truncated_completion_is_scored_as_the_rm_was_trained(tmp_path, template):
    """A completion cut at max_new_tokens (no EOS) is scored as text + EOS, the layout the
    reward model saw for the same (truncated) text in training; never mid-answer."""
    bb = _reward_backbone(template)
    bb.train(False)
    tok = bb.tokenizer
    k = 3
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"system": SYSTEM, "prompt": p}) + "\n" for p, _ in CASES))
    prompts = load_prompts(prompts_file, tok, 256)
    ro = _rollout(bb, prompts, [r for _, r in CASES], truncate_at=k)
    ended = torch.isin(ro.labels, torch.tensor(bb.eos_token_ids())).any(1)
    assert not ended.all()  # some rows were cut at max_new_tokens
    # what training sees for these answers: the prompt + the answer's tokens + EOS, read at the EOS
    expected_ids = [pr.input_ids + [t for t, m in zip(row[ro.prompt_len:].tolist(), mask.tolist())
                                    if m and t != tok.eos_token_id] + [tok.eos_token_id]
                    for pr, row, mask in zip(prompts, ro.input_ids, ro.response_mask)]
    ids, attn = pad(expected_ids, tok.pad_token_id)
    with torch.no_grad():
        expected = bb.reward_scores(ids, attn)
    ro = score_rollout(bb, ro, with_values=False)
    torch.testing.assert_close(ro.scores, expected.float(), rtol=1e-4, atol=1e-5)


def test_reward_ids_layout():
    bb = _reward_backbone()
    tok = bb.tokenizer
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    ids = reward_ids(tok, msgs, "hello", 256)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "hello" \
        + tok.eos_token
