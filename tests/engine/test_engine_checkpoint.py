import pytest
import safetensors.torch
import torch

from rlfuse.engine import checkpoint as ck


def _no_tmp_files(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")] == []


def test_failed_save_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    ck.save_safetensors_atomic({"w": torch.ones(3)}, path)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # half a file, then the "crash"
            fh.write(b"\x00" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_safetensors_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(ck.load_safetensors(path)["w"], torch.ones(3))  # old content, intact
    assert _no_tmp_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_interrupt_also_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ck.save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def _save(stage_dir, step, value):
    return ck.save_checkpoint(stage_dir, step, adapter={"a": torch.full((2,), float(value))},
                              adapter_config={"r": 8}, heads={"value_head.proj.weight": torch.ones(1, 2)},
                              trainer_state={"step": step}, keep=2)


def test_checkpoint_commit_point_is_latest(tmp_path, monkeypatch):
    stage = tmp_path / "ppo"
    _save(stage, 1, 1.0)
    assert ck.latest_checkpoint(stage).name == "ckpt-0000001"

    real_save = torch.save

    def crash_on_state(obj, f, *a, **k):
        raise RuntimeError("killed while writing trainer_state")

    monkeypatch.setattr(torch, "save", crash_on_state)
    with pytest.raises(RuntimeError):
        _save(stage, 2, 2.0)
    monkeypatch.setattr(torch, "save", real_save)
    latest = ck.latest_checkpoint(stage)  # the half-written step 2 is never pointed at
    assert latest.name == "ckpt-0000001"
    torch.testing.assert_close(ck.load_safetensors(latest / "adapter_model.safetensors")["a"], torch.ones(2))
    assert _no_tmp_files(stage)


def test_pruning_keeps_the_newest(tmp_path):
    stage = tmp_path / "sft"
    for step in range(1, 5):
        _save(stage, step, step)
    assert sorted(p.name for p in stage.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000004"]
    assert ck.resolve_checkpoint(stage).name == "ckpt-0000004"
    assert ck.load_heads(ck.resolve_checkpoint(stage))["value_head.proj.weight"].shape == (1, 2)
    with pytest.raises(FileNotFoundError):
        ck.resolve_checkpoint(tmp_path / "nothing")


# --------------------------------------------------------------------------- issue 15: fallbacks, NaN, modes

def test_latest_naming_a_deleted_folder_falls_back_to_the_newest_complete(tmp_path):
    import shutil

    stage = tmp_path / "sft"
    for step in (1, 2):
        _save(stage, step, step)
    shutil.rmtree(stage / "ckpt-0000002")  # `latest` still names it
    assert ck.latest_checkpoint(stage).name == "ckpt-0000001"
    assert ck.latest_pointer(stage) == "ckpt-0000002"


def test_truncated_file_is_skipped_when_verifying(tmp_path):
    stage = tmp_path / "sft"
    for step in (1, 2):
        _save(stage, step, step)
    adapter = stage / "ckpt-0000002" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:20])  # a copy that stopped half way
    assert ck.latest_checkpoint(stage, verify=True).name == "ckpt-0000001"
    state = stage / "ckpt-0000001" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:10])
    assert ck.latest_checkpoint(stage, verify=True) is None


@pytest.mark.parametrize("where", ["adapter", "heads", "optimizer"])
def test_non_finite_checkpoint_is_refused_before_writing(tmp_path, where):
    bad = torch.tensor([1.0, float("nan")])
    kwargs = dict(adapter={"a": torch.ones(2)}, adapter_config={"r": 8}, heads={"h": torch.ones(2)},
                  trainer_state={"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}})
    if where == "adapter":
        kwargs["adapter"] = {"a": bad}
    elif where == "heads":
        kwargs["heads"] = {"h": bad}
    else:
        kwargs["trainer_state"]["optimizer"]["state"][0]["exp_avg"] = bad
    with pytest.raises(ValueError, match="non-finite checkpoint"):
        ck.save_checkpoint(tmp_path / "sft", 1, **kwargs)
    assert not (tmp_path / "sft").exists()


def test_atomic_files_get_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        ck.write_text_atomic(tmp_path / "a.txt", "x")
        ck.save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == \
        {"a.txt": 0o644, "w.safetensors": 0o644}
