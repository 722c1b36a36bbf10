"""Adjoint Matching and FAIL train through the Trainer on tiny models of the real classes (SD 1.5, SD3, FLUX).

Each model folder is written by the real diffusers pipeline class and loaded by `pipelines.load`, as a
downloaded checkpoint would be; one full round (rollout, reward or discriminator, update, evaluation,
checkpoint) must run and move the weights.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import genft
import pipelines
from reward_models import RewardModel
from _tiny_real import LOAD_KW, save_family

PROMPTS = ["a red cat on the moon", "a blue dog", "the green 7"]


class Brightness(RewardModel):
    """Differentiable mean pixel value (first-order methods back-propagate through it)."""

    name = "brightness"
    supports_grad = True

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _common(tmp_path):
    return dict(output_dir=str(tmp_path / "run"), num_rounds=1, prompts_per_round=2, samples_per_prompt=2,
                num_inference_steps=3, learning_rate=1e-3, progress=False, eval_images_per_prompt=1, eval_rewards=[], seed=0,
                guidance_scale=3.0)


def _run(tmp_path, family, config, reward):
    save_family(family, tmp_path / "model")
    pipe = pipelines.load(str(tmp_path / "model"), **LOAD_KW.get(family, {}))
    trainer = genft.Trainer(config, pipeline=pipe, reward=reward, prompts=PROMPTS[:2], eval_prompts=PROMPTS[:1])
    before = {k: v.clone() for k, v in trainer.pipeline.unet.state_dict().items()}
    result = trainer.train()
    assert result["after"] is not None and (tmp_path / "run" / "checkpoints" / "final" / "COMPLETE").is_file()
    return any(not torch.equal(v, before[k]) for k, v in trainer.pipeline.unet.state_dict().items())


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_adjoint_matching_on_real_classes(tmp_path, family):
    config = genft.load_config(method="adjoint_matching", model=str(tmp_path / "model"), timesteps_per_trajectory=2,
                               train_batch_size=4, reward_multiplier=10.0, **_common(tmp_path))
    assert _run(tmp_path, family, config, Brightness(differentiable=True))


def _expert_folder(path, size):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((size, size, 3)) * 60 + 180).astype(np.uint8)).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(PROMPTS[i % 2])
    return path


@pytest.mark.parametrize("variant", ["pd", "pg"])
def test_fail_on_flux_class(tmp_path, variant):
    expert = _expert_folder(tmp_path / "expert", size=32)  # resized to the generator's image size on first use
    config = genft.load_config(method="fail", variant=variant, model=str(tmp_path / "model"), expert_data=str(expert),
                               disc_steps=1, disc_batch_size=4, disc_warmup_rounds=0, train_batch_size=4, num_mc=2,
                               reward="jpeg_compressibility", eval_eta=0.0, **_common(tmp_path))
    assert _run(tmp_path, "flux", config, None)


@pytest.mark.parametrize("method,family", [("dpok", "sd15"), ("grpo", "sd15"), ("grpo", "sd3"), ("grpo", "flux")])
def test_policy_gradient_methods_on_real_classes(tmp_path, method, family):
    extra = {"p_batch_size": 4, "gradient_accumulation": 1, "p_step": 1} if method == "dpok" else {"train_batch_size": 4}
    config = genft.load_config(method=method, model=str(tmp_path / "model"), eta=1.0 if family == "sd15" else 0.8,
                               reward="jpeg_compressibility", **extra, **_common(tmp_path))
    assert _run(tmp_path, family, config, Brightness())


def test_rocm_on_the_latent_consistency_class(tmp_path):
    config = genft.load_config(method="rocm", model=str(tmp_path / "model"), train_batch_size=4, eval_eta=1.0,
                               **{**_common(tmp_path), "num_inference_steps": 2})
    assert _run(tmp_path, "lcm", config, Brightness(differentiable=True))
