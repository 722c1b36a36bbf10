"""One-step generators: x0 = g(z, c) from a diffusion UNet at t*, as a T = 1 Trajectory; save/load, determinism, errors."""
import json

import pytest
import torch

from pipelines import DiffusionPipeline, OneStepPipeline, detect_family, one_step_x0
from _tiny import tiny_diffusion_pipeline

PROMPTS = ["a red cat", "a blue dog", "the moon"]
T_STAR = 80  # of the tiny scheduler's 100 training steps


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def base():
    return tiny_diffusion_pipeline()


@pytest.fixture()
def gen(base):
    return OneStepPipeline.from_diffusion(base, T_STAR, base_model="/some/base")


def test_one_step_sample_is_the_base_x0_prediction_from_pure_noise(base, gen):
    traj = gen.rollout(PROMPTS, generator=_gens([0, 1, 2]))
    assert traj.latents.shape == (3, 2, 3, 8, 8) and traj.num_steps == 1 and traj.timesteps.tolist() == [T_STAR]
    assert traj.stds.tolist() == [0.0] and (traj.log_probs == 0).all() and traj.log_probs.shape == (3, 1)
    z = traj.latents[:, 0]
    torch.testing.assert_close(z, torch.stack([torch.randn(3, 8, 8, generator=g) for g in _gens([0, 1, 2])]))
    with torch.no_grad():
        eps = base.unet(z, torch.tensor(T_STAR), encoder_hidden_states=base.encode_prompt(PROMPTS)).sample
    abar = base.scheduler.alphas_cumprod[T_STAR]
    torch.testing.assert_close(traj.latents[:, 1], (z - (1 - abar).sqrt() * eps) / abar.sqrt())
    torch.testing.assert_close(traj.images, (traj.latents[:, 1] / 2 + 0.5).clamp(0, 1))
    assert gen.unet is not base.unet and gen.text_encoder is base.text_encoder  # the UNet is the generator's own copy


def test_sampling_is_deterministic_under_seed_and_batch_independent(gen):
    a = gen.sample(PROMPTS, generator=_gens([5, 6, 7]))
    b = gen.sample(PROMPTS, generator=_gens([5, 6, 7]))
    assert torch.equal(a, b)
    alone = gen.sample(PROMPTS[1:2], generator=_gens([6]))
    torch.testing.assert_close(alone[0], a[1])
    assert not torch.equal(gen.sample(PROMPTS, generator=_gens([8, 9, 10])), a)


def test_save_load_round_trip_gives_identical_samples(gen, tmp_path):
    with torch.no_grad():  # trained weights, not the base's, must survive the round trip
        gen.unet.conv_out.bias.add_(0.1)
    gen.save_pretrained(tmp_path / "one_step")
    index = json.loads((tmp_path / "one_step" / "model_index.json").read_text())
    assert index["genft_family"] == "one_step" and index["genft_one_step_timestep"] == T_STAR
    assert index["genft_base_model"] == "/some/base" and detect_family(str(tmp_path / "one_step")) == "one_step"
    again = OneStepPipeline.from_pretrained(tmp_path / "one_step")
    assert again.timestep == T_STAR and again.base_model == "/some/base"
    assert torch.equal(again.sample(PROMPTS, generator=_gens([1, 2, 3])), gen.sample(PROMPTS, generator=_gens([1, 2, 3])))


def test_rescore_reproduces_the_stored_step_with_gradients(gen):
    traj = gen.rollout(PROMPTS, generator=_gens([0, 1, 2]))
    step = gen.rescore(traj, 0)
    torch.testing.assert_close(step.mean, traj.latents[:, 1].float())
    assert (step.log_prob == 0).all() and not step.stochastic.any()
    step.mean.square().mean().backward()
    assert gen.unet.conv_out.weight.grad is not None and gen.unet.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only step 0"):
        gen.rescore(traj, 1)


def test_generator_guidance_and_prediction_types(gen):
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = gen.rollout(PROMPTS, latents=z, guidance_scale=3.0)
    assert traj.negative_prompt_embeds is not None and not torch.equal(traj.latents[:, 1], gen.rollout(PROMPTS, latents=z).latents[:, 1])
    out, a = torch.randn(2, 3), torch.tensor(0.3)
    torch.testing.assert_close(one_step_x0(out, z[:2, 0, 0, :3], a, "sample"), out)
    x = torch.randn(2, 3)
    v_x0 = one_step_x0(out, x, a, "v_prediction")
    torch.testing.assert_close(v_x0, a.sqrt() * x - (1 - a).sqrt() * out)


def test_one_step_refuses_other_step_counts_noise_and_bad_folders(base, gen, tmp_path):
    with pytest.raises(ValueError, match="exactly 1 step"):
        gen.rollout(PROMPTS, num_inference_steps=2)
    with pytest.raises(ValueError, match="eta=0.5"):
        gen.sample(PROMPTS, eta=0.5)
    with pytest.raises(ValueError, match="timestep=100"):
        OneStepPipeline.from_diffusion(base, 100)
    base.save_pretrained(tmp_path / "diffusion")
    with pytest.raises(ValueError, match="not a one-step generator folder|no model_index.json"):
        OneStepPipeline.from_pretrained(tmp_path / "diffusion")
    with pytest.raises(ValueError, match="needs a diffusion pipeline"):
        OneStepPipeline.from_diffusion(gen, 10)
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "diffusion"), DiffusionPipeline)


@pytest.mark.slow
def test_toy_one_step_generator_follows_heldout_prompts(pretrained_toy_world):
    """`model: toyworld-one-step` (the toy base at t* = 900, no training) already follows most held-out prompts."""
    from genft.toyworld import OracleEvaluator, heldout_prompts
    from genft.toyworld.one_step_init import TOY_ONE_STEP_TIMESTEP, build_toy_one_step

    gen = build_toy_one_step(progress=False, base_path=str(pretrained_toy_world["path"]))
    assert gen.timestep == TOY_ONE_STEP_TIMESTEP and gen.base_model == str(pretrained_toy_world["path"])
    prompts = heldout_prompts()
    images = gen.sample(prompts, generator=_gens(range(len(prompts))))
    acc = OracleEvaluator().evaluate(images, prompts)
    assert acc["fg_acc"] >= 0.8 and acc["all_acc"] >= 0.5, acc
