"""The toy world's flow base: trained on the world's frozen text encoder, saved atomically, validated and reused."""
import json

import pytest
import torch

import genft.toyworld.flow_pretrain as fp
from pipelines import FlowMatchPipeline, detect_family


def test_flow_base_is_trained_saved_and_reused(world, monkeypatch):
    cfg = fp.FlowPretrainConfig(steps=3, batch_size=4, eval_images_per_prompt=0)
    path = fp.load_or_pretrain_flow(world_dir=world, config=cfg, progress=False)
    assert path == world.with_name("toyworld-v2-flow")
    meta = fp.validate_flow_world(path)
    assert meta["stats"]["flow_steps"] == 3 and meta["world"] == str(world)
    assert detect_family(str(path)) == "flow"
    for f in ("tokenizer/vocab.json", "text_encoder/model.safetensors"):  # the world's own text side, unchanged
        assert (path / f).read_bytes() == (world / f).read_bytes()
    pipe = FlowMatchPipeline.from_pretrained(path)
    images = pipe.sample(["a red 7 on a blue background"], generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    assert images.shape == (1, 3, 16, 16)

    monkeypatch.setattr(fp, "pretrain_flow", lambda *a, **k: pytest.fail("a valid flow base was retrained"))
    assert fp.load_or_pretrain_flow(world_dir=world, progress=False) == path


def test_a_broken_flow_base_is_reported(world, tmp_path):
    bad = tmp_path / "toyworld-v2-flow"
    bad.mkdir()
    with pytest.raises(ValueError, match="incomplete: missing genft_toyworld_flow.json"):
        fp.validate_flow_world(bad)
    (bad / fp.FLOW_META_FILE).write_text(json.dumps({"flow_format_version": 0}))
    for f in fp.FLOW_REQUIRED_FILES:
        (bad / f).parent.mkdir(parents=True, exist_ok=True)
        (bad / f).write_text("{}")
    with pytest.raises(ValueError, match="flow_format_version 0"):
        fp.validate_flow_world(bad)


def test_recipe_settings_are_checked():
    with pytest.raises(ValueError, match="sigma_sampling"):
        fp.FlowPretrainConfig(sigma_sampling="beta")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fp.FlowPretrainConfig(steps=0)
    sig = fp.sample_sigmas(1000, fp.FlowPretrainConfig(), torch.Generator().manual_seed(0))
    assert 0 < sig.min() and sig.max() < 1 and abs(sig.median().item() - 0.5) < 0.05
