"""The diffusion pipeline: rollouts record exact log-probs that re-scoring reproduces."""
import pytest
import torch

from pipelines import DiffusionPipeline
from _tiny import tiny_diffusion_pipeline

PROMPTS = ["a red cat", "a blue dog", "the moon", "a green cat on the moon", "a 7", "a red 1", "a blue 2", "a 3"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_diffusion_pipeline()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_rescore_reproduces_rollout_log_probs(pipe, batch):
    traj = pipe.rollout(PROMPTS[:batch], generator=torch.Generator().manual_seed(0), num_inference_steps=6, guidance_scale=3.0)
    assert traj.log_probs.shape == (batch, 6) and traj.latents.shape[:2] == (batch, 7)
    with torch.no_grad():
        for k in range(traj.num_steps):
            step = pipe.rescore(traj, k)
            torch.testing.assert_close(step.log_prob, traj.log_probs[:, k], rtol=0, atol=1e-5)
            # one sample at a time, i.e. under a different batch size than the rollout's
            for i in range(batch):
                single = pipe.rescore(traj.select([i]), k)
                torch.testing.assert_close(single.log_prob, traj.log_probs[i:i + 1, k], rtol=0, atol=1e-5)
        # per-sample step indices, shuffled, in one call
        ks = torch.randint(0, traj.num_steps, (batch,), generator=torch.Generator().manual_seed(1))
        mixed = pipe.rescore(traj, ks)
        torch.testing.assert_close(mixed.log_prob, traj.log_probs[torch.arange(batch), ks], rtol=0, atol=1e-5)


def test_ratio_is_one_and_gradient_flows(pipe):
    traj = pipe.rollout(PROMPTS[:3], generator=torch.Generator().manual_seed(0), num_inference_steps=4, guidance_scale=3.0)
    step = pipe.rescore(traj, 1)
    ratio = torch.exp(step.log_prob - traj.log_probs[:, 1])
    torch.testing.assert_close(ratio, torch.ones(3), rtol=0, atol=1e-5)
    ratio.sum().backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    pipe.unet.zero_grad()


def test_rollout_is_deterministic_and_batch_independent_with_per_sample_generators(pipe):
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    a = pipe.rollout(PROMPTS[:3], generator=gens(), num_inference_steps=4)
    b = pipe.rollout(PROMPTS[:3], generator=gens(), num_inference_steps=4)
    assert torch.equal(a.latents, b.latents)
    alone = pipe.rollout(PROMPTS[1:2], generator=[torch.Generator().manual_seed(101)], num_inference_steps=4)
    torch.testing.assert_close(alone.images[0], a.images[1], rtol=1e-4, atol=1e-5)


def test_images_in_unit_range_and_sample_is_deterministic(pipe):
    imgs = pipe.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    again = pipe.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert imgs.shape == (2, 3, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1
    assert torch.equal(imgs, again)


def test_over_long_prompt_is_refused_before_sampling(pipe):
    with pytest.raises(ValueError, match="at most 12"):
        pipe.rollout(["a red cat on the moon " * 3], num_inference_steps=2)
    with pytest.raises(ValueError, match="empty"):
        pipe.rollout([], num_inference_steps=2)


def test_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    a = pipe.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    b = loaded.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    torch.testing.assert_close(a, b)
