"""EMA of the trained weights (diffusers' EMAModel): closed form on a toy parameter, swap-in for evaluation."""
import pytest
import torch
from torch.testing import assert_close

from genft.config import ConfigError
from genft.ema import ema_decay_at, ema_weights, make_ema
from genft.methods.dpok import DPOKConfig


def test_decay_schedule_closed_form():
    assert ema_decay_at(1, 0.9) == 0.0  # the first update copies the weights
    assert ema_decay_at(2, 0.9) == pytest.approx(2 / 11)
    assert ema_decay_at(5, 0.9) == pytest.approx(5 / 14)
    assert ema_decay_at(1000, 0.9) == 0.9


def test_ema_matches_closed_form_on_a_toy_parameter():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = make_ema([p], decay=0.8)
    values = [torch.tensor([1.0, -2.0]) * (k + 2) for k in range(40)]
    shadow = p.detach().clone()
    for k, v in enumerate(values, start=1):
        with torch.no_grad():
            p.copy_(v)
        ema.step([p])
        d = ema_decay_at(k, 0.8)
        shadow = d * shadow + (1 - d) * v
    # Late in the run the decay is the configured one: shadow_k = 0.8·shadow_{k−1} + 0.2·p_k.
    assert ema_decay_at(40, 0.8) == 0.8
    assert_close(ema.shadow_params[0], shadow)


def test_ema_weights_swap_in_and_restore():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = make_ema([p], decay=0.5)
    for v in (4.0, 8.0, 12.0):
        with torch.no_grad():
            p.fill_(v)
        ema.step([p])
    averaged = ema.shadow_params[0].clone()
    assert not torch.equal(averaged, p.detach())
    with ema_weights(ema, [p]):
        assert_close(p.detach(), averaged)
    assert p.item() == 12.0
    with ema_weights(None, [p]):  # EMA off: the trained weights stay
        assert p.item() == 12.0


def test_state_dict_round_trip_and_off_switch():
    p = torch.nn.Parameter(torch.randn(3))
    ema = make_ema([p], decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            p.add_(1.0)
        ema.step([p])
    other = make_ema([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert_close(other.shadow_params[0], ema.shadow_params[0])
    assert other.optimization_step == 3
    assert make_ema([p], decay=0.0) is None
    with pytest.raises(ValueError, match="ema_decay"):
        make_ema([p], decay=1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        DPOKConfig(ema_decay=1.5).validate()
