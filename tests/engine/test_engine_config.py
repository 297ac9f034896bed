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
