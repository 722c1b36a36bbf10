"""Config refusal and round-trips: unknown keys, wrong types, impossible values, YAML and overrides."""
import pytest
import yaml

import genft
from genft import ConfigError, DPOKConfig, load_config
from genft.config import parse_overrides


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def test_overrides_apply_after_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dpok\nlearning_rate: 1e-4\np_step: 3\n")
    cfg = load_config(path, ["p_step=7", "eval_rewards=[a,b]", "resume_from=null"])
    assert cfg.learning_rate == 1e-4 and cfg.p_step == 7 and cfg.eval_rewards == ["a", "b"] and cfg.resume_from is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["learning_rat=1e-4"], r"unknown config key.*'learning_rat'.*did you mean 'learning_rate'"),
        (["p_step=1.5"], r"p_step=1.5 must be an integer"),
        (["p_step=0"], r"p_step=0 must be >= 1"),
        (["learning_rate=-1"], r"learning_rate=-1.0 must be > 0"),
        (["kl_form=l2"], r"kl_form='l2' is not allowed; choose one of 'gaussian' \| 'eps'"),
        (["eta=0"], r"eta=0.0: DPOK needs a stochastic sampler"),
        (["progress=maybe"], r"progress='maybe' must be true or false"),
        (["guidance_scale=0.5"], r"guidance_scale=0.5 must be >= 1"),
        (["train_step_fraction=0"], r"train_step_fraction=0.0 must be in \(0, 1\]"),
        (["method=ppo"], r"method='ppo' is unknown; choose one of .*dpok"),
        (["eval_rewards=oops"], r"eval_rewards='oops' must be a list"),
        (["stat_min_count=40"], r"stat_min_count=40 cannot exceed stat_buffer_size=32"),
        (["nokey"], r"must look like key=value"),
        (["resolution=512"], r"resolution=512 applies to hub/folder models; model='toyworld' is fixed"),
        (["model=some/model", "max_sequence_length=0"], r"max_sequence_length=0 must be a positive integer"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_missing_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_every_field_has_help_text():
    import dataclasses

    for f in dataclasses.fields(DPOKConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "reward_weight" in DPOKConfig.field_help()


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a=1", "b=1e-4", "c=true", "d=x y", "e=[1,2]"]) == {"a": 1, "b": "1e-4", "c": True, "d": "x y", "e": [1, 2]}
    assert load_config(overrides=["learning_rate=1e-4"]).learning_rate == 1e-4


def test_trainer_refuses_missing_prompt_file_before_loading_a_model(tmp_path):
    cfg = load_config(prompts=str(tmp_path / "missing.txt"), output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"prompts=.*missing.txt.*one prompt per line"):
        genft.Trainer(cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        genft.Trainer(load_config(prompts=str(empty), output_dir=str(tmp_path / "run")))


def test_trainer_refuses_unknown_reward_before_loading_a_model(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red cat\n")
    cfg = load_config(prompts=str(p), eval_prompts=str(p), reward="aesthetic_typo", output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="unknown reward 'aesthetic_typo'"):
        genft.Trainer(cfg)
