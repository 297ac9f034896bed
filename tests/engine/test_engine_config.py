import pytest

from rlfuse.engine.config import RunConfig, apply_overrides, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 7\nppo:\n  kl_coef: 0.1\n  advantage: grpo\nmodel:\n  lora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(cfg_file, ["ppo.lr=1e-5", "ppo.clip_eps_high=0.28", "ppo.kl_in_loss=true", "sft.max_steps=none"])
    assert cfg.seed == 7 and cfg.ppo.kl_coef == 0.1 and cfg.ppo.advantage == "grpo"
    assert cfg.ppo.lr == 1e-5 and isinstance(cfg.ppo.lr, float)  # YAML reads "1e-5" as a string
    assert cfg.ppo.clip_eps_high == 0.28 and cfg.ppo.kl_in_loss is True and cfg.sft.max_steps is None
    assert cfg.model.lora_target_modules == "q_proj,v_proj"
    assert RunConfig().ppo.kl_coef == 0.05  # defaults untouched


def test_bundled_preset_loads():
    cfg = load_config("tiny")
    assert cfg.model.name_or_path == "tiny" and cfg.ppo.n_samples == 2


@pytest.mark.parametrize("override", ["ppo.lrr=1", "nosuch=1", "ppo.lr.x=1", "ppo=1"])
def test_unknown_key_is_named(override):
    with pytest.raises(ValueError) as err:
        apply_overrides(RunConfig(), [override])
    assert override.split("=")[0] in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'ppo.kl_coeff'"):
        load_config(cfg_file)


def test_bad_value_type():
    with pytest.raises(ValueError, match="ppo.max_steps"):
        apply_overrides(RunConfig(), ["ppo.max_steps=lots"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(RunConfig(), ["ppo.max_steps"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_config("no_such.yaml")


def test_cli_import_is_light():
    import subprocess
    import sys

    code = ("import sys, rlfuse.engine.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- issue 15: validation up front

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rlfuse.engine.config import to_dict, validate  # noqa: E402


@pytest.mark.parametrize("override, key", [
    ("sft.batch_size=-4", "sft.batch_size"), ("rm.batch_size=0", "rm.batch_size"),
    ("ppo.max_steps=0", "ppo.max_steps"), ("sft.max_steps=0", "sft.max_steps"), ("ppo.n_samples=0", "ppo.n_samples"),
    ("ppo.ppo_epochs=0", "ppo.ppo_epochs"), ("ppo.max_prompt_length=0", "ppo.max_prompt_length"),
    ("ppo.gamma=1.5", "ppo.gamma"), ("ppo.lam=-0.1", "ppo.lam"), ("ppo.clip_eps=0", "ppo.clip_eps"),
    ("ppo.clip_eps=.inf", "ppo.clip_eps"), ("ppo.lr=.nan", "ppo.lr"), ("sft.lr=0", "sft.lr"),
    ("ppo.minibatch_size=0", "ppo.minibatch_size"), ("save_every=0", "save_every"),
    ("nonfinite=ignore", "nonfinite"), ("device=gpu", "device")])
def test_validate_names_key_and_value(override, key):
    cfg = apply_overrides(RunConfig(), [override])
    with pytest.raises(ValueError, match=rf"'{key}'") as err:
        validate(cfg)
    assert override.split("=")[1].lstrip(".").lower()[:3] in str(err.value).lower()
    assert "\n" not in str(err.value)


def test_defaults_and_presets_validate():
    validate(RunConfig())
    validate(load_config("tiny"))


def test_invalid_number_fails_before_any_model_load(cli, data, tmp_path, monkeypatch):
    import rlfuse.engine.backbone as backbone

    monkeypatch.setattr(backbone, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before validating"))
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--set", "sft.batch_size=0")
    assert code == 2 and "'sft.batch_size'" in err and not (tmp_path / "run").exists()


def test_unknown_key_hint_lists_valid_keys():
    with pytest.raises(ValueError, match=r"valid keys at ppo: .*prompts"):
        apply_overrides(RunConfig(), ["ppo.prompt=x.jsonl"])


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                     st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_KEYS = st.sampled_from(sorted(k for sec, v in to_dict(RunConfig()).items()
                               for k in ([f"{sec}.{kk}" for kk in v] if isinstance(v, dict) else [sec])))


@settings(max_examples=300, deadline=None, database=None)
@given(key=st.one_of(_KEYS, st.text(max_size=12)), value=_SCALARS)
def test_coercion_and_validation_raise_only_valueerror(key, value):
    try:
        cfg = apply_overrides(RunConfig(), {key: value} if "." not in key else [f"{key}={value}"])
        validate(cfg)
    except ValueError as exc:
        assert key.split(".")[0] in str(exc) or "key=value" in str(exc) or "config key" in str(exc)


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=40))
def test_yaml_file_raises_only_valueerror(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(text)
    try:
        validate(load_config(p))
    except ValueError as exc:
        assert str(p) in str(exc) or "config key" in str(exc)
