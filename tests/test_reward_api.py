"""The reward API: loading by name/path/instance, shape and finiteness checks, JPEG rewards."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import reward_models
from reward_models import JpegCompressibility, JpegIncompressibility, RewardError, RewardModel


class Constant(RewardModel):
    name = "constant"

    def __init__(self, value=1.0, shape=None):
        super().__init__()
        self.value, self.shape = value, shape

    def score(self, images, prompts):
        return torch.full(self.shape or (images.shape[0],), self.value)


def test_load_by_name_path_class_and_instance():
    assert isinstance(reward_models.load("jpeg_compressibility"), JpegCompressibility)
    assert isinstance(reward_models.load("reward_models.jpeg:JpegIncompressibility"), JpegIncompressibility)
    assert isinstance(reward_models.load(Constant, value=2.0), Constant)
    inst = Constant()
    assert reward_models.load(inst) is inst


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        reward_models.load("aesthetics_typo")
    with pytest.raises(ValueError, match="cannot import"):
        reward_models.load("nowhere.module:Nothing")


def test_wrong_shape_and_non_finite_outputs_raise_clear_errors():
    imgs = torch.rand(3, 3, 8, 8)
    with pytest.raises(RewardError, match=r"shape \(2,\).*expected \[3\]"):
        Constant(shape=(2,))(imgs, ["a"] * 3)
    with pytest.raises(RewardError, match="non-finite"):
        Constant(value=float("nan"))(imgs, ["a"] * 3)


def test_bad_inputs_are_refused():
    r = Constant()
    with pytest.raises(ValueError, match="one prompt per image"):
        r(torch.rand(3, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        r(torch.rand(3, 8, 8), ["a"] * 3)
    with pytest.raises(TypeError, match="uint8"):
        r(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"])


def test_jpeg_size_matches_pil_and_orders_flat_below_noise():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=g)
    imgs = torch.cat([flat, noise])
    comp = JpegCompressibility()(imgs, ["x", "y"])
    incomp = JpegIncompressibility()(imgs, ["x", "y"])
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)
    buf = io.BytesIO()
    arr = (noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert incomp[1].item() == pytest.approx(buf.tell() / 1000.0)
