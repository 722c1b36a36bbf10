"""Method × generator and method × reward mismatches are refused before any model is loaded."""
import json

import pytest

import genft
import genft.trainer as trainer_mod
from genft.config import ConfigError
from genft.methods import METHODS
from genft.methods.dpok import DPOK
from pipelines import detect_family
from _tiny import tiny_diffusion_pipeline


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(trainer_mod, "load_pipeline", refuse)


def _as_family(folder, scheduler_class):
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = scheduler_class
    cfg_path.write_text(json.dumps(cfg))


def test_detect_family_reads_config_files_only(tmp_path):
    folder = tmp_path / "model"
    tiny_diffusion_pipeline().save_pretrained(folder)
    assert detect_family(str(folder)) == "diffusion"
    _as_family(folder, "LCMScheduler")
    assert detect_family(str(folder)) == "consistency"
    _as_family(folder, "FlowMatchEulerDiscreteScheduler")
    assert detect_family(str(folder)) == "flow"
    assert detect_family("some-org/some-hub-model") is None


def test_dpok_on_a_consistency_model_is_refused_before_loading(tmp_path, no_model_loading):
    folder = tmp_path / "model"
    tiny_diffusion_pipeline().save_pretrained(folder)
    _as_family(folder, "LCMScheduler")
    cfg = genft.load_config(model=str(folder), reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"method='dpok' works on diffusion/flow/mirror generators.*consistency model"):
        genft.Trainer(cfg, prompts=["a cat"], eval_prompts=["a cat"])


class FirstOrder(DPOK):
    """A stand-in first-order method: only the declaration matters for this check."""

    name = "first_order_probe"
    needs_reward_gradient = True


def test_first_order_method_refuses_a_reward_without_gradients(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.setitem(METHODS, "first_order_probe", FirstOrder)
    cfg = genft.load_config(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"))
    cfg.method = "first_order_probe"
    with pytest.raises(ConfigError, match=r"first_order_probe.*differentiable.*jpeg_compressibility"):
        genft.Trainer(cfg, prompts=["a cat"], eval_prompts=["a cat"])


def test_over_long_prompt_is_refused_before_the_first_sample(tmp_path, monkeypatch):
    pipe = tiny_diffusion_pipeline()
    monkeypatch.setattr(type(pipe), "rollout", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    cfg = genft.load_config(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"))
    long_prompt = " ".join(["red"] * 40)
    with pytest.raises(ConfigError, match=r"eval_prompts: prompt .* tokens long .* shorten it"):
        genft.Trainer(cfg, pipeline=pipe, prompts=["a cat"], eval_prompts=["a dog", long_prompt])
    with pytest.raises(ConfigError, match=r"prompts: prompt '  ' is empty"):
        genft.Trainer(cfg, pipeline=pipe, prompts=["a cat", "  "], eval_prompts=["a dog"])
