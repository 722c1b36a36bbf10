"""Pure loss math against closed forms: clipped surrogates, KL forms, advantage normalisers."""
import pytest
import torch

from genft.advantages import PerPromptStatTracker, group_normalize, normalize
from genft.losses import clipped_policy_loss, eps_kl, importance_ratio


def test_ppo_surrogate_closed_form_and_gradients():
    lp_old = torch.zeros(4)
    lp = torch.tensor([0.0, 0.3, -0.3, 0.05], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss = clipped_policy_loss(lp, lp_old, adv, clip_range=0.1, mode="ppo")
    r = torch.exp(lp.detach())
    expected = torch.maximum(-adv * r, -adv * r.clamp(0.9, 1.1))
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # clipped where the ratio left the band in the advantage's favour: zero gradient there
    assert lp.grad[1] == 0 and lp.grad[2] == 0
    torch.testing.assert_close(lp.grad[[0, 3]], (-adv * r)[[0, 3]])


def test_clamp_surrogate_has_no_gradient_outside_the_band():
    lp = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    loss = clipped_policy_loss(lp, torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]), clip_range=1e-4, mode="clamp")
    loss.sum().backward()
    assert lp.grad[0] == pytest.approx(-1.0) and lp.grad[1] == 0 and lp.grad[2] == 0


def test_ratio_and_eps_kl():
    torch.testing.assert_close(importance_ratio(torch.tensor([0.5]), torch.tensor([0.5])), torch.ones(1))
    a, b = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2) * 2
    torch.testing.assert_close(eps_kl(a, b), torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="mode"):
        clipped_policy_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, mode="other")


def test_group_and_batch_normalisation():
    r = torch.tensor([1.0, 3.0, 10.0, 20.0])
    adv = group_normalize(r, ["a", "a", "b", "b"], eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    glob = group_normalize(r, ["a", "a", "b", "b"], eps=0.0, global_std=True)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 1.0, -5.0, 5.0]) / r.std(unbiased=False))
    torch.testing.assert_close(normalize(r, eps=0).mean(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_per_prompt_tracker_falls_back_to_batch_then_uses_history():
    t = PerPromptStatTracker(buffer_size=4, min_count=2)
    first = t.update(["a", "b"], torch.tensor([1.0, 3.0]))  # a has 1 < 2 values: batch stats
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    second = t.update(["a", "a"], torch.tensor([2.0, 3.0]))  # a's history [1,2,3]
    hist = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(second, (torch.tensor([2.0, 3.0]) - hist.mean()) / hist.std(unbiased=False), atol=1e-5, rtol=0)
    state = t.state_dict()
    t2 = PerPromptStatTracker()
    t2.load_state_dict(state)
    assert list(t2.stats["a"]) == [1.0, 2.0, 3.0]
