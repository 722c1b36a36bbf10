"""ConsistencyPipeline: the LCM step as an exact Gaussian policy, agreement with diffusers, and the LCM folder layout."""
import math

import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from pipelines import (FINAL_STEP, ConsistencyPipeline, consistency_output, detect_family, guidance_scale_embedding,
                       lcm_prev_timesteps, lcm_step)
from _tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

PROMPTS = ["a red cat", "the moon", "a blue dog"]


def tiny_lcm_scheduler(**kw) -> LCMScheduler:
    cfg = dict(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-3, beta_end=0.05, original_inference_steps=20)
    cfg.update(kw)
    return LCMScheduler(**cfg)


def tiny_consistency_unet(time_cond_proj_dim=8, in_channels=3):
    """The tiny test UNet, reading a guidance embedding as LCM UNets do (diffusers' default-value list dropped)."""
    base = tiny_unet(in_channels=in_channels)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": time_cond_proj_dim})


def tiny_consistency_pipeline(time_cond_proj_dim=8) -> ConsistencyPipeline:
    """A tiny pixel-space LCM: tiny UNet (optionally with a w-embedding), tiny CLIP text encoder, LCMScheduler."""
    tok = tiny_tokenizer()
    unet = tiny_consistency_unet(time_cond_proj_dim) if time_cond_proj_dim else tiny_unet()
    return ConsistencyPipeline(unet=unet, text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                               scheduler=tiny_lcm_scheduler())


@pytest.mark.parametrize("proj", [8, None], ids=["w-embedding", "cfg"])
def test_rescoring_reproduces_rollout_log_probs_exactly(proj):
    pipe = tiny_consistency_pipeline(proj)
    traj = pipe.rollout(PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=4, guidance_scale=2.5)
    assert (traj.negative_prompt_embeds is None) == (proj is not None)  # CFG only without the guidance embedding
    assert traj.latents.shape == (3, 5, 3, 8, 8) and traj.log_probs.shape == (3, 4)
    assert traj.stds[-1] == 0 and (traj.stds[:-1] > 0).all() and (traj.log_probs[:, -1] == 0).all()
    with torch.no_grad():
        for k in range(traj.num_steps):
            assert torch.equal(pipe.rescore(traj, k).log_prob, traj.log_probs[:, k])
        mixed = torch.tensor([0, 2, 1])  # per-sample steps, as a replay buffer holds them
        torch.testing.assert_close(pipe.rescore(traj, mixed).log_prob, traj.log_probs[torch.arange(3), mixed], rtol=0, atol=1e-6)
    step = pipe.rescore(traj, 1)
    step.log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())


def test_rollout_is_deterministic_under_seed_and_batch_independent_with_per_sample_generators():
    pipe = tiny_consistency_pipeline()
    a = pipe.rollout(PROMPTS, generator=torch.Generator().manual_seed(7), num_inference_steps=3)
    b = pipe.rollout(PROMPTS, generator=torch.Generator().manual_seed(7), num_inference_steps=3)
    c = pipe.rollout(PROMPTS, generator=torch.Generator().manual_seed(8), num_inference_steps=3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batched = pipe.rollout(PROMPTS, generator=gens, num_inference_steps=3)
    alone = pipe.rollout(PROMPTS[1:2], generator=[torch.Generator().manual_seed(101)], num_inference_steps=3)
    torch.testing.assert_close(batched.latents[1:2], alone.latents, rtol=0, atol=1e-5)


def test_log_prob_is_the_closed_form_gaussian_of_rlcm():
    sched = tiny_lcm_scheduler()
    g = torch.Generator().manual_seed(0)
    x, out, prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, t_prev = 59, 39
    step = lcm_step(out, t, x, sched, t_prev, prev_sample=prev)
    a_t, a_p = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    f = c_skip * x + c_out * x0
    mean, std = a_p.sqrt() * f, (1 - a_p).sqrt()
    expect = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, expect)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, std.expand(2))
    torch.testing.assert_close(step.pred_original_sample, consistency_output(out, t, x, sched))
    summed = lcm_step(out, t, x, sched, t_prev, prev_sample=prev, reduce="sum").log_prob
    torch.testing.assert_close(summed, expect * 48)
    final = lcm_step(out, t, x, sched, FINAL_STEP)  # the last step returns f itself, with no log-prob
    assert torch.equal(final.prev_sample, f.float()) and (final.std == 0).all() and (final.log_prob == 0).all()


def test_eta_interpolates_between_lcm_and_a_deterministic_jump():
    sched = tiny_lcm_scheduler()
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    full = lcm_step(out, 59, x, sched, 39, eta=1.0, generator=torch.Generator().manual_seed(0))
    half = lcm_step(out, 59, x, sched, 39, eta=0.5, generator=torch.Generator().manual_seed(0))
    none = lcm_step(out, 59, x, sched, 39, eta=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(half.std, 0.5 * full.std)
    assert (none.std == 0).all() and torch.equal(none.prev_sample, none.mean) and (none.log_prob == 0).all()
    # The marginal variance around √ᾱ_prev·f is (1−ᾱ_prev) for every η: mean shift² + std² is fixed.
    a_t, a_p = sched.alphas_cumprod[59], sched.alphas_cumprod[39]
    eps = (x - a_t.sqrt() * full.pred_original_sample) / (1 - a_t).sqrt()
    torch.testing.assert_close(half.mean - full.mean, (1 - a_p).sqrt() * math.sqrt(0.75) * eps)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        lcm_step(out, 59, x, sched, 39, eta=1.5)


def test_sampling_matches_diffusers_lcm_scheduler_step_loop():
    pipe = tiny_consistency_pipeline()
    traj = pipe.rollout(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=4, guidance_scale=2.0)
    g = torch.Generator().manual_seed(0)
    x = randn_tensor((2, 3, 8, 8), generator=g)
    sched = LCMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    assert torch.equal(sched.timesteps, traj.timesteps)
    for t in sched.timesteps:
        with torch.no_grad():
            out = pipe.model_output(x, t, traj.prompt_embeds, None, 2.0)
        x = sched.step(out, t, x, generator=g).prev_sample
    torch.testing.assert_close(x, traj.latents[:, -1], rtol=0, atol=1e-6)


def test_step_noises_are_the_draws_and_replay_the_trajectory():
    pipe = tiny_consistency_pipeline()
    traj = pipe.rollout(PROMPTS, generator=torch.Generator().manual_seed(3), num_inference_steps=3)
    z = pipe.step_noises(traj)
    g = torch.Generator().manual_seed(3)
    randn_tensor((3, 3, 8, 8), generator=g)  # the initial latents
    torch.testing.assert_close(z[:, 0], randn_tensor((3, 3, 8, 8), generator=g), rtol=0, atol=1e-4)
    assert (z[:, -1] == 0).all()
    x = traj.latents[:, 0]
    prevs = lcm_prev_timesteps(traj.timesteps)
    with torch.no_grad():
        for k in range(traj.num_steps):
            out = pipe.model_output(x, traj.timesteps[k], traj.prompt_embeds, None, traj.guidance_scale)
            x = lcm_step(out, traj.timesteps[k], x, pipe.scheduler, prevs[k], variance_noise=z[:, k]).prev_sample
            torch.testing.assert_close(x, traj.latents[:, k + 1], rtol=0, atol=1e-5)


def test_guidance_embedding_is_diffusers_lcm_embedding():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 3.5, 8.0])
    ours = guidance_scale_embedding(w, 32, 3)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    torch.testing.assert_close(ours, theirs)


def test_schedule_and_off_schedule_timesteps():
    pipe = tiny_consistency_pipeline()
    ts = pipe.timesteps(4)
    assert ts.tolist() == [99, 74, 49, 24]
    assert lcm_prev_timesteps(ts).tolist() == [74, 49, 24, FINAL_STEP]
    assert pipe.prev_timesteps(torch.tensor([49, 99]), 4).tolist() == [24, 74]
    with pytest.raises(ValueError, match="not on the 4-step LCM schedule"):
        pipe.prev_timesteps(torch.tensor([50]), 4)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        pipe.timesteps(0)


def _diffusers_lcm(tmp_path):
    """A tiny latent LCM written by diffusers' own LatentConsistencyModelPipeline (with a VAE)."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    hf = LatentConsistencyModelPipeline(vae=vae, text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                                        unet=tiny_consistency_unet(in_channels=4), scheduler=tiny_lcm_scheduler(),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    hf.save_pretrained(tmp_path / "lcm")
    return hf, tmp_path / "lcm"


def test_loads_a_diffusers_lcm_folder_and_samples_the_same_images(tmp_path):
    import pipelines

    hf, path = _diffusers_lcm(tmp_path)
    assert detect_family(str(path)) == "consistency"
    pipe = ConsistencyPipeline.from_pretrained(path)
    assert pipe.vae is not None and pipe.embeds_guidance and pipe.latent_shape == (4, 8, 8)
    ours = pipe.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=2, guidance_scale=4.0)
    with torch.no_grad():
        theirs = hf(PROMPTS[:2], num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert isinstance(pipelines.load(str(path)), ConsistencyPipeline)


def test_save_and_load_round_trip(tmp_path):
    import pipelines

    pipe = tiny_consistency_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    assert detect_family(str(tmp_path / "m")) == "consistency"
    again = pipelines.load(str(tmp_path / "m"))
    assert isinstance(again, ConsistencyPipeline) and again.vae is None
    a = pipe.sample(PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    b = again.sample(PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    assert torch.equal(a, b) and a.shape == (3, 3, 8, 8)
