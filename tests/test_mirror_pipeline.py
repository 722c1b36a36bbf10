"""The prompt-conditioned mirror flow pipeline: dual-space rollouts, samples inside the box, save/load, DPOK and AM on it."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genft import train
from genft.config import ConfigError
from genft.methods import AdjointMatchingConfig, DPOKConfig
from genft.models import load_pipeline
from pipelines import MirrorFlowMatchPipeline, StudentTPrior, detect_family, mirror_map
from reward_models import RewardModel

from _tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

PROMPTS = ["a red cat", "a blue dog"]


def tiny_mirror_pipeline(prior=None, mirror="box_regularized"):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    return MirrorFlowMatchPipeline(unet=tiny_unet(), text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                                   scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), mirror=mirror_map(mirror),
                                   prior=prior)


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("mirror", ["box_regularized", "box_entropic"])
def test_samples_are_strictly_inside_the_box_even_from_wild_latents(mirror):
    pipe = tiny_mirror_pipeline(mirror=mirror)
    traj = pipe.rollout(PROMPTS, generator=gens(2), num_inference_steps=3, guidance_scale=2.0, noise_level=0.7)
    assert bool(((traj.images > 0) & (traj.images < 1)).all())
    wild = torch.tensor([-1e6, -50.0, 0.0, 50.0, 1e6]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    x = pipe.decode(wild)
    assert bool(((x > 0) & (x < 1)).all())
    assert torch.equal(x.argsort(dim=-1), torch.arange(5).expand_as(x))  # ∇Ψ* is increasing


def test_rollout_log_probs_are_dual_space_gaussians_that_rescore_exactly():
    pipe = tiny_mirror_pipeline()
    traj = pipe.rollout(PROMPTS, generator=gens(2), num_inference_steps=3, guidance_scale=2.0, noise_level=0.7)
    for k in range(traj.num_steps):
        with torch.no_grad():
            step = pipe.rescore(traj, k)
        torch.testing.assert_close(step.log_prob, traj.log_probs[:, k], rtol=0, atol=1e-5)
    # the stored latents are dual coordinates: mapping the images back reproduces the last latent
    torch.testing.assert_close(pipe.to_dual(traj.images), traj.latents[:, -1].float(), rtol=1e-4, atol=1e-4)


def test_decode_gradient_is_the_inverse_hessian():
    pipe = tiny_mirror_pipeline()
    y = torch.linspace(-3, 3, 12, dtype=torch.float64).view(1, 3, 2, 2).float().requires_grad_(True)
    x = pipe.decode(y)
    (g,) = torch.autograd.grad(x.sum(), y)
    h = 1e-3
    numeric = (pipe.decode(y.detach() + h) - pipe.decode(y.detach() - h)) / (2 * h)
    torch.testing.assert_close(g, numeric, rtol=2e-2, atol=1e-4)


def test_save_and_load_restore_the_mirror_and_prior(tmp_path):
    pipe = tiny_mirror_pipeline(prior=StudentTPrior(nu=7.0))
    pipe.save_pretrained(tmp_path / "m")
    assert detect_family(str(tmp_path / "m")) == "mirror"
    cfg = json.loads((tmp_path / "m" / "mirror" / "mirror_config.json").read_text())
    assert cfg == {"mirror": "box_regularized", "eps": 1e-6, "kappa": 0.3, "prior": "student_t", "nu": 7.0, "multivariate": True}
    again = load_pipeline(str(tmp_path / "m"), torch.device("cpu"))
    assert isinstance(again, MirrorFlowMatchPipeline) and again.prior.nu == 7.0
    a = pipe.sample(PROMPTS, generator=gens(2), num_inference_steps=2, guidance_scale=1.0)
    b = again.sample(PROMPTS, generator=gens(2), num_inference_steps=2, guidance_scale=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_folder_without_a_mirror_config_is_refused(tmp_path):
    from _tiny import tiny_flow_pipeline

    tiny_flow_pipeline().save_pretrained(tmp_path / "flow")
    with pytest.raises(ValueError, match="mirror_config.json"):
        MirrorFlowMatchPipeline.from_pretrained(tmp_path / "flow")


class MeanBrightness(RewardModel):
    """Differentiable mean pixel value: pushes pixels toward the box's upper face (which they can never cross)."""

    name = "mean_brightness"
    supports_grad = True

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _loop_kwargs(tmp_path):
    return dict(output_dir=str(tmp_path), num_rounds=1, prompts_per_round=2, samples_per_prompt=2, num_inference_steps=2,
                guidance_scale=1.0, eval_images_per_prompt=1, eval_rewards=[], progress=False, learning_rate=1e-3)


@pytest.mark.parametrize("method", ["dpok", "adjoint_matching"])
def test_finetuners_train_a_mirror_pipeline_in_dual_space(tmp_path, method):
    pipe = tiny_mirror_pipeline()
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    if method == "dpok":
        config = DPOKConfig(method="dpok", **_loop_kwargs(tmp_path))
    else:
        config = AdjointMatchingConfig(method="adjoint_matching", timesteps_per_trajectory=2, **_loop_kwargs(tmp_path))
    result = train(config, pipeline=pipe, reward=MeanBrightness(differentiable=method == "adjoint_matching"),
                   prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert result["after"] is not None
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, pipe.unet.parameters()))


def test_adjoint_matching_refuses_a_heavy_tailed_prior(tmp_path):
    pipe = tiny_mirror_pipeline(prior=StudentTPrior())
    config = AdjointMatchingConfig(method="adjoint_matching", timesteps_per_trajectory=2, **_loop_kwargs(tmp_path))
    with pytest.raises((ValueError, ConfigError), match="Gaussian base noise"):
        train(config, pipeline=pipe, reward=MeanBrightness(differentiable=True), prompts=PROMPTS, eval_prompts=PROMPTS[:1])


def test_toy_mirror_base_is_trained_in_dual_space_and_cached(tmp_path):
    import genft.toyworld.flow_pretrain as fp
    from genft.toyworld.pretrain import PretrainConfig, pretrain

    world = pretrain(tmp_path / "toyworld-v2", PretrainConfig(contrastive_steps=2, contrastive_batch_size=8, unet_steps=1,
                                                              eval_images_per_prompt=0), progress=False)
    cfg = fp.FlowPretrainConfig(steps=2, batch_size=4, eval_images_per_prompt=0, mirror="box_regularized")
    path = fp.load_or_pretrain_mirror(world_dir=world, config=cfg, progress=False)
    assert path == world.with_name("toyworld-v2-mirror") and detect_family(str(path)) == "mirror"
    with pytest.raises(ValueError, match="without a mirror map"):
        fp.validate_mirror_world(fp.load_or_pretrain_flow(world_dir=world, config=fp.FlowPretrainConfig(
            steps=1, batch_size=2, eval_images_per_prompt=0), progress=False))
    pipe = load_pipeline(str(path), torch.device("cpu"))
    images = pipe.sample(["a red 7 on a blue background"], generator=torch.Generator().manual_seed(0), num_inference_steps=2, guidance_scale=1.0)
    assert images.shape == (1, 3, 16, 16) and bool(((images > 0) & (images < 1)).all())
