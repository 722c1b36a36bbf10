"""Attention backends: sdpa and math agree, 'auto' picks by device and package, xformers fails clearly without CUDA."""
import pytest
import torch
from torch.testing import assert_close

import pipelines._attention as attention
from _tiny import tiny_unet
from genft.config import ConfigError
from genft.methods.dpok import DPOKConfig
from pipelines import resolve_attention_backend, set_attention_backend


def _unet_output(unet, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        return unet(x.to(device), torch.tensor([5, 70], device=device), encoder_hidden_states=emb.to(device)).sample.cpu()


def test_sdpa_and_math_give_the_same_unet_output():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = tiny_unet()
    assert set_attention_backend(unet, "math") == "math"
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    math = _unet_output(unet)
    assert set_attention_backend(unet, "sdpa") == "sdpa"
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert_close(_unet_output(unet), math, atol=1e-5, rtol=1e-5)


def test_sdpa_and_math_agree_on_a_dispatching_transformer():
    """FLUX's processors go through diffusers' attention dispatcher: the backend is set per processor."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3))
    outs = {}
    for name in ("math", "sdpa"):
        set_attention_backend(flux, name)
        assert {p._attention_backend for p in flux.attn_processors.values()} == {attention._DISPATCH[name]}
        with torch.no_grad():
            outs[name] = flux(**args).sample
    assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)


def test_auto_rule(monkeypatch):
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    assert resolve_attention_backend("auto", "cuda") == "xformers"
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert resolve_attention_backend("auto", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        resolve_attention_backend("flash", "cpu")


def test_xformers_without_cuda_or_package_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"attention_backend='xformers' needs a CUDA device.*attention_backend=sdpa"):
        set_attention_backend(tiny_unet(), "xformers")
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    with pytest.raises(ValueError, match=r"xformers package is not importable.*pip install xformers"):
        resolve_attention_backend("xformers", "cuda")
    with pytest.raises(ConfigError, match="attention_backend='xformers'"):
        DPOKConfig(attention_backend="xformers", device="cpu").validate()
    # With device=auto (CPU here; on CUDA the package is patched away above) the Trainer refuses before loading a model.
    from genft.trainer import Trainer

    c = DPOKConfig(attention_backend="xformers", device="auto", output_dir=str(tmp_path), reward="jpeg_compressibility",
                   eval_rewards=[], progress=False)
    with pytest.raises(ConfigError, match="attention_backend='xformers'"):
        Trainer(c, pipeline=object(), prompts=["a red cat"], eval_prompts=["a red cat"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree():
    unet = tiny_unet().cuda()
    set_attention_backend(unet, "math")
    reference = _unet_output(unet, "cuda")
    names = ["sdpa"] + (["xformers"] if attention.xformers_available() else [])
    for name in names:
        assert set_attention_backend(unet, name) == name
        assert_close(_unet_output(unet, "cuda"), reference, atol=1e-4, rtol=1e-4)
    assert set_attention_backend(unet, "auto") == ("xformers" if attention.xformers_available() else "sdpa")
