"""`rlfuse generate` and `rlfuse chat` on a tiny trained policy, through the engine's own sampler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import FAST, WORDS, read_rows, write_jsonl

from rlfuse.engine.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in WORDS])
    run_dir = root / "run"
    assert main([str(a) for a in ["sft", "--data", sft, *FAST, "--run-dir", run_dir, "--max-steps", "2",
                                  "--set", "sft.lr=0.02"]]) == 0
    return run_dir


@pytest.fixture(scope="module")
def policy(run):
    from rlfuse.engine.trained import load_trained

    return load_trained(run, device="cpu").backbone


def _prompts(tmp_path, n=3):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS[:n]]
                       + [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}])


def test_generate_greedy_matches_the_engine_sampler(run, policy, tmp_path, cli):
    from rlfuse.engine.data import load_prompts, pad
    from rlfuse.engine.generate import completion_text

    prompts = _prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli("generate", run, "--prompts", prompts, "--out", out, "--max-new-tokens", 6,
                            "--device", "cpu", "--batch-size", 3)
    assert code == 0, err
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["prompt"] == "hi"
    ps = load_prompts(prompts, policy.tokenizer, 256)
    for p, row in zip(ps, rows):
        ids, attn = pad([p.input_ids], policy.tokenizer.pad_token_id, side="left")
        ours = policy.generate(ids, attn, max_new_tokens=6, greedy=True)[0, ids.shape[1]:].tolist()
        assert (row["completion"], row["finished"]) == completion_text(policy.tokenizer, ours, policy.eos_token_ids())


def test_generate_sampling_is_reproducible_and_batch_independent(run, tmp_path):
    prompts = _prompts(tmp_path)
    outs = []
    for bs in (1, 8):
        out = tmp_path / f"out{bs}.jsonl"
        assert main([str(a) for a in ["generate", run, "--prompts", prompts, "--out", out, "--temperature", "1.5",
                                      "--n-samples", 2, "--max-new-tokens", 8, "--batch-size", bs,
                                      "--device", "cpu", "--seed", 3]]) == 0
        outs.append(read_rows(out))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 8 and [(r["index"], r["sample"]) for r in outs[0][:2]] == [(0, 0), (0, 1)]
    assert len({r["completion"] for r in outs[0]}) > 1  # it samples


def test_generate_refuses_to_overwrite(run, tmp_path, cli):
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n")
    code, _, err = cli("generate", run, "--prompts", _prompts(tmp_path), "--out", out, "--device", "cpu")
    assert code == 2 and "--force" in err and out.read_text() == "keep\n"
    code, _, err = cli("generate", tmp_path / "nope", "--prompts", _prompts(tmp_path), "--out", tmp_path / "o.jsonl")
    assert code == 2 and "checkpoint not found" in err


def test_chat_loop_streams_keeps_history_and_obeys_commands(policy):
    from rlfuse.engine.chat import Chat, chat_loop
    from rlfuse.engine.data import encode_prompt

    lines = iter(["say red", "and again", "/system be kind", "hello", "/reset", "/bogus", "/quit", "never read"])
    written = []
    chat = Chat(policy, temperature=0, max_new_tokens=8)
    seen_prompts = []
    reply = chat.reply

    def spy(user, write):
        text = reply(user, write)
        seen_prompts.append(list(chat.messages()))
        return text

    chat.reply = spy
    assert chat_loop(chat, lambda prompt: next(lines), written.append) == 0
    assert next(lines) == "never read"  # /quit stopped the loop
    # second turn saw the first turn's question and answer (multi-turn history)
    second = seen_prompts[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert second[0]["content"] == "say red" and second[2]["content"] == "and again"
    # /system cleared the conversation and put the system message first
    assert [m["role"] for m in seen_prompts[2]] == ["system", "user", "assistant"]
    assert seen_prompts[2][0]["content"] == "be kind"
    assert chat.history == [] and chat.system == "be kind"  # after /reset
    assert any("unknown command '/bogus'" in w for w in written)
    # the reply was streamed: several pieces between "bot> " and the newline, adding up to the answer
    start = written.index("bot> ")
    end = written.index("\n", start)
    pieces = written[start + 1:end]
    assert "".join(pieces) == seen_prompts[0][1]["content"]
    assert len(pieces) > 1
    # greedy chat = the engine's greedy sampler on the rendered template
    ids = torch.tensor([encode_prompt(policy.tokenizer, [{"role": "user", "content": "say red"}])])
    ours = policy.generate(ids, torch.ones_like(ids), max_new_tokens=8, greedy=True)[0, ids.shape[1]:].tolist()
    eos = set(policy.eos_token_ids())
    ours = ours[:next((i for i, t in enumerate(ours) if t in eos), len(ours))]
    assert seen_prompts[0][1]["content"] == policy.tokenizer.decode(ours, skip_special_tokens=True)


def test_chat_drops_oldest_turns_when_the_context_is_full(policy):
    from rlfuse.engine.chat import Chat

    chat = Chat(policy, temperature=0, max_new_tokens=1000)  # tiny has 1024 positions
    chat.history = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}]
    chat.reply("z" * 10, lambda s: None)
    assert chat.history[0]["content"] == "z" * 10 and len(chat.history) == 2


def test_chat_command_in_a_subprocess(run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlfuse.engine.cli", "chat", str(run), "--device", "cpu",
                           "--temperature", "0", "--max-new-tokens", "4"],
                          input="say red\n/reset\n/quit\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "bot> " in proc.stdout and "conversation cleared" in proc.stdout


def test_readme_after_training_commands_parse():
    """Every command of the README's "After training" section is accepted by the parser."""
    import re
    import shlex
    from pathlib import Path

    from rlfuse.engine.cli import build_parser

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## After training: export, chat, generate", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^rlfuse (.*)$", section, re.M)
    assert {c.split()[0] for c in commands} == {"export", "generate", "chat", "eval"}
    for command in commands:
        for variant in (re.sub(r"\[[^\]]*\]", "", command), command.replace("[", "").replace("]", "")):
            build_parser().parse_args(shlex.split(variant))  # without and with the [optional] parts


def test_generate_reads_prompts_through_datasets_with_a_column_map(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    from rlfuse.engine import dataset_files

    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"question": f"say {w}"} for w in WORDS[:2]])}
                         ).save_to_disk(str(tmp_path / "qs"))
    out = tmp_path / "out.jsonl"
    try:
        assert main([str(a) for a in ["generate", run, "--prompts", tmp_path / "qs", "--split", "test", "--out", out,
                                      "--max-new-tokens", 3, "--device", "cpu",
                                      "--set", "data.prompt_column=question"]]) == 0
    finally:
        dataset_files.configure(None)
    assert [r["prompt"] for r in read_rows(out)] == ["say red", "say blue"]
