"""The README's code examples run as written."""
import re
from pathlib import Path

import torch

import reward_models

README = Path(__file__).resolve().parents[1] / "README.md"


def _tested_blocks():
    text = README.read_text()
    return re.findall(r"<!-- tested by tests/test_readme.py -->\s*```python\n(.*?)```", text, flags=re.S)


def test_reward_plugin_example_runs_and_is_under_20_lines():
    blocks = _tested_blocks()
    assert blocks, "the README lost its tested reward example"
    code = blocks[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) < 20
    namespace: dict = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
        scores = namespace["scores"]
        assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
        images = torch.rand(2, 3, 8, 8, requires_grad=True)
        namespace["reward"](images, ["a", "b"]).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
    finally:
        reward_models._registry._REGISTRY.pop("saturation", None)
