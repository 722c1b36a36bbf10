"""Property-based fuzzing: the config loader and the reward API refuse any bad input with a clear error, never a crash."""
import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genft import ConfigError, DPOKConfig, load_config
from genft.config import parse_overrides
from reward_models import JpegCompressibility, RewardError

FIELDS = [f.name for f in dataclasses.fields(DPOKConfig)]
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=15))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=6))
def test_config_loader_accepts_or_names_the_problem(data):
    try:
        cfg = DPOKConfig.from_dict(data)
    except ConfigError as e:
        msg = str(e)
        assert any(k in msg or repr(k) in msg for k in map(str, data)) or "method" in msg, msg
    else:
        assert cfg.learning_rate > 0 and cfg.p_step >= 1
        assert all(v == v and abs(v) != float("inf") for v in cfg.to_dict().values() if isinstance(v, float))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=5))
def test_override_strings_never_crash(items):
    try:
        load_config(overrides=items)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 3), channels=st.integers(1, 4), size=st.integers(1, 9),
    n_prompts=st.integers(0, 4), dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.int64]),
)
def test_reward_api_inputs_are_refused_or_scored(batch, channels, size, n_prompts, dtype):
    images = (torch.rand(batch, channels, size, size) * (255 if not dtype.is_floating_point else 1)).to(dtype)
    prompts = ["p"] * n_prompts
    try:
        out = JpegCompressibility()(images, prompts)
    except (ValueError, TypeError) as e:
        assert str(e) and not isinstance(e, RewardError)
    else:
        assert out.shape == (batch,) and out.dtype == torch.float32 and torch.isfinite(out).all()
