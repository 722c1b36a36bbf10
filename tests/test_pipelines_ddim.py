"""The DDIM Gaussian-policy step: equals diffusers' step, and its log-prob is the exact Normal density."""
import pytest
import torch
from diffusers import DDIMScheduler

from pipelines import ddim_step, gaussian_kl, gaussian_log_prob
from _tiny import tiny_scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, clip_sample):
    sched = tiny_scheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    for t in sched.timesteps[:-1]:
        ref = sched.step(out, int(t), x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        ours = ddim_step(out, int(t), x, sched, eta=eta, variance_noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-6)
        if eta == 0:
            torch.testing.assert_close(ours.mean, ref, rtol=1e-5, atol=1e-6)


def test_ddim_step_per_sample_timesteps_match_single():
    sched = tiny_scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, out, noise = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    ts = sched.timesteps[[0, 4, 7]]
    batched = ddim_step(out, ts, x, sched, variance_noise=noise)
    for i, t in enumerate(ts):
        single = ddim_step(out[i:i + 1], int(t), x[i:i + 1], sched, variance_noise=noise[i:i + 1])
        torch.testing.assert_close(batched.prev_sample[i:i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i:i + 1], single.log_prob)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_agrees_with_torch_normal(reduce):
    sched = tiny_scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x, out, prev = (torch.randn(5, 3, 8, 8, generator=g) for _ in range(3))
    step = ddim_step(out, int(sched.timesteps[2]), x, sched, eta=1.0, prev_sample=prev, reduce=reduce)
    assert step.log_prob.dtype == torch.float32 and step.log_prob.shape == (5,)
    dist = torch.distributions.Normal(step.mean, step.std.view(-1, 1, 1, 1))
    ref = dist.log_prob(prev).flatten(1)
    ref = ref.mean(1) if reduce == "mean" else ref.sum(1)
    torch.testing.assert_close(step.log_prob, ref, rtol=1e-5, atol=1e-5)


def test_given_prev_sample_is_scored_not_resampled():
    sched = tiny_scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    drawn = ddim_step(out, int(sched.timesteps[1]), x, sched, generator=torch.Generator().manual_seed(9))
    scored = ddim_step(out, int(sched.timesteps[1]), x, sched, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.prev_sample, drawn.prev_sample)
    torch.testing.assert_close(scored.log_prob, drawn.log_prob, rtol=0, atol=1e-6)


def test_gaussian_kl_closed_form_matches_torch():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.3, 1.0, 2.5])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(a, std.view(-1, 1, 1, 1)), torch.distributions.Normal(b, std.view(-1, 1, 1, 1))
    ).flatten(1)
    torch.testing.assert_close(gaussian_kl(a, b, std), ref.mean(1))
    torch.testing.assert_close(gaussian_kl(a, b, std, reduce="sum"), ref.sum(1))


def test_zero_std_step_is_deterministic_with_zero_log_prob():
    x = torch.randn(2, 3)
    lp = gaussian_log_prob(x, x + 1, torch.tensor([0.0, 1.0]))
    assert lp[0] == 0 and torch.isfinite(lp).all()


def test_bad_arguments_are_refused():
    sched = tiny_scheduler()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step(x, 50, x, sched)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x, 50, x, sched, eta=-1)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ddim_step(x, 50, x, sched, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, x, 1.0, reduce="max")
