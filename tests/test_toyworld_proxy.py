"""The toy world's proxy CLIP: recipe, open_clip local-dir round trip, masked InfoNCE, Spearman, atomic cache."""
import json
import math

import numpy as np
import pytest
import torch

from genft.toyworld import proxy as proxy_mod
from genft.toyworld.data import Combo, caption, heldout_combos, render
from genft.toyworld.proxy import (
    ProxyConfig,
    ToyProxyCLIPScore,
    build_proxy_model,
    cosine_scores,
    digit_split,
    load_or_train_proxy,
    load_proxy,
    masked_clip_loss,
    save_proxy,
    train_proxy_clip,
    validate_proxy,
)
from genft.toyworld.proxy_eval import mismatched_combo, rankdata, spearman

TINY = dict(embed_dim=16, vision_width=16, vision_layers=1, vision_head_width=8, text_width=16, text_layers=1,
            text_heads=2, steps=3, batch_size=16, warmup_steps=1, eval_images_per_combo=1)


@pytest.fixture(scope="module")
def tiny_proxy(tmp_path_factory):
    model, stats = train_proxy_clip(ProxyConfig(**TINY), progress=False)
    path = save_proxy(model, tmp_path_factory.mktemp("proxy") / "toy-proxy", meta={"stats": stats})
    return model, stats, path


def _batch():
    combos = [Combo(7, "red", "blue"), Combo(3, "white", "green"), Combo(0, "yellow", "red")]
    images = render(combos, generator=torch.Generator().manual_seed(0))
    return images, [caption(*c) for c in combos]


def test_tiny_recipe_trains_and_round_trips_through_open_clip_local_dir(tiny_proxy):
    import open_clip

    model, stats, path = tiny_proxy
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])
    assert 0.0 <= stats["retrieval_top1_heldout"] <= 1.0
    torch.manual_seed(0)  # the recipe builds its model right after seeding with config.seed
    init = build_proxy_model(ProxyConfig(**TINY).model_cfg())
    assert not torch.equal(init.visual.conv1.weight, model.visual.conv1.weight), "training did not update the weights"
    cfg = json.loads((path / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 16 and cfg["preprocess_cfg"]["size"] == 16
    assert (path / "open_clip_model.safetensors").is_file()

    loaded = open_clip.create_model_from_pretrained(f"local-dir:{path}", return_transform=False).eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    images, prompts = _batch()
    x = proxy_mod.normalize_images(images)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x))
        torch.testing.assert_close(loaded.encode_text(tokenizer(prompts)), model.encode_text(tokenizer(prompts)))
        torch.testing.assert_close(loaded.logit_scale, model.logit_scale)
    again, tok = load_proxy(path)
    torch.testing.assert_close(cosine_scores(again, tok, images, prompts), cosine_scores(model, tokenizer, images, prompts))


def test_reward_is_clipscore_of_the_proxy(tiny_proxy):
    model, _, path = tiny_proxy
    images, prompts = _batch()
    reward = ToyProxyCLIPScore(path)
    assert reward.name == "toy_proxy_clip"
    cos = cosine_scores(model, proxy_mod.build_tokenizer(ProxyConfig().context_length), images, prompts)
    torch.testing.assert_close(reward(images, prompts), 2.5 * cos.clamp(min=0))
    torch.testing.assert_close(ToyProxyCLIPScore(path, mode="cosine")(images, prompts), cos)
    pixels = images.clone().requires_grad_(True)  # differentiable, so first-order methods can hack it too
    ToyProxyCLIPScore(path, mode="cosine", differentiable=True)(pixels, prompts).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_masked_clip_loss_matches_a_hand_computed_example():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # row 2 is not unit length: the loss normalises
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    scale = torch.tensor(0.0)  # log(1): logits are the cosines [[1,0,0],[0,1,1],[1,0,0]]
    # Captions 0 and 1 are the same (group 0): pairs (0,1) and (1,0) leave the denominators.
    # Image->text rows: [1,-inf,0]->0, [-inf,1,1]->1, [1,0,0]->2; text->image rows: [1,-inf,1]->0, [-inf,1,0]->1, [0,1,0]->2.
    a, b, c = math.log(1 + math.exp(-1)), math.log(2), math.log(math.e + 2)
    expected = 0.5 * ((a + b + c) / 3 + (b + a + c) / 3)
    got = masked_clip_loss(img, txt, scale, torch.tensor([0, 0, 1]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    d, e = math.log(1 + 2 / math.e), math.log(2 + 1 / math.e)  # unmasked rows [1,0,0]->0 and [0,1,1]->1
    unmasked = 0.5 * ((d + e + c) / 3 + (e + d + c) / 3)
    assert masked_clip_loss(img, txt, scale).item() == pytest.approx(unmasked, abs=1e-6)
    leaf = img.clone().requires_grad_(True)
    masked_clip_loss(leaf, txt, scale, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(leaf.grad).all()
    with pytest.raises(ValueError, match="groups must have shape"):
        masked_clip_loss(img, txt, scale, torch.tensor([0, 1]))


def test_spearman_and_rankdata_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (2, 5, 50, 400):
        x, y = rng.normal(size=n), rng.normal(size=n) + 0.5 * rng.normal(size=n)
        ties_x, ties_y = rng.integers(0, 4, size=n).astype(float), rng.integers(0, 3, size=n).astype(float)
        for u, v in ((x, y), (x, x + 0.1 * y), (ties_x, y), (ties_x, ties_y)):
            if np.ptp(u) == 0 or np.ptp(v) == 0:
                continue
            assert spearman(u, v) == pytest.approx(stats.spearmanr(u, v).statistic, abs=1e-10)
        np.testing.assert_allclose(rankdata(torch.from_numpy(ties_x)).numpy(), stats.rankdata(ties_x))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_mismatched_combos_differ_and_digit_split_is_disjoint():
    gen = torch.Generator().manual_seed(0)
    for combo in heldout_combos():
        other = mismatched_combo(combo, gen)
        assert other != combo and other.fg != other.bg
    train, held = digit_split(0.2)
    assert len(set(train.tolist()) & set(held.tolist())) == 0 and len(train) + len(held) == 1797


def test_cache_is_atomic_and_refuses_corrupt_folders(tiny_proxy, tmp_path, monkeypatch):
    model, _, good = tiny_proxy
    target = tmp_path / "toy-proxy"

    def crash():
        raise RuntimeError("simulated crash while writing the proxy")

    with monkeypatch.context() as m:  # the crash comes after the weights are written
        m.setattr(proxy_mod, "_world_identity", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_proxy(model, target)
    assert list(tmp_path.iterdir()) == [], "a crashed save left files behind"

    save_proxy(model, target)
    validate_proxy(target)
    before = (target / "open_clip_model.safetensors").read_bytes()
    with monkeypatch.context() as m:  # a crashed re-save keeps the old complete copy
        m.setattr(proxy_mod, "_world_identity", crash)
        with pytest.raises(RuntimeError):
            save_proxy(model, target)
    assert (target / "open_clip_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy-proxy"]

    weights = target / "open_clip_model.safetensors"
    weights.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        validate_proxy(target)
    with pytest.raises(ValueError, match="corrupt"):
        load_proxy(target)
    with pytest.raises(ValueError, match="corrupt"):
        ToyProxyCLIPScore(target)
    weights.unlink()
    with pytest.raises(ValueError, match="missing open_clip_model.safetensors"):
        validate_proxy(target)
    meta = json.loads((good / proxy_mod.PROXY_META_FILE).read_text())
    (target / "open_clip_model.safetensors").write_bytes(before)
    (target / proxy_mod.PROXY_META_FILE).write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="format_version"):
        validate_proxy(target)


def test_load_or_train_proxy_trains_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("GENFT_HOME", str(tmp_path))
    assert proxy_mod.default_proxy_dir() == tmp_path / "toyworld-v2-proxy"
    (tmp_path / "toyworld-v2-proxy").mkdir()  # an empty (broken) folder is rebuilt
    path = load_or_train_proxy(progress=False, config=ProxyConfig(**{**TINY, "eval_images_per_combo": 0}))
    assert path == tmp_path / "toyworld-v2-proxy"
    assert validate_proxy(path)["config"]["steps"] == 3

    def no_training(*args, **kwargs):
        raise AssertionError("a valid cached proxy must not be retrained")

    monkeypatch.setattr(proxy_mod, "train_proxy_clip", no_training)
    assert load_or_train_proxy(progress=False) == path


def test_evaluation_smoke_on_a_tiny_world(tiny_proxy, tmp_path):
    from genft.toyworld import PretrainConfig, pretrain
    from genft.toyworld.proxy_eval import ProxyEvalConfig, evaluate_proxy

    world = pretrain(tmp_path / "world", PretrainConfig(
        text_hidden_size=16, text_layers=1, contrastive_steps=1, contrastive_batch_size=8, unet_channels=(8, 16),
        unet_steps=1, batch_size=2, warmup_steps=1, eval_images_per_prompt=0), progress=False)
    config = ProxyEvalConfig(images_per_prompt=1, clean_per_prompt=1, settings={"cfg3": (3.0, 2, True), "uncond": (1.0, 2, False)})
    result = evaluate_proxy(world, tiny_proxy[2], config, progress=False)
    assert result["all"]["n"] == 4 * 30 and result["generated"]["n"] == 2 * 30
    assert set(result["by_source"]) == {"cfg3", "uncond", "clean_match", "clean_mismatch"}
    assert result["by_source"]["clean_match"]["accuracy"] >= 0.9 >= 0.1 >= result["by_source"]["clean_mismatch"]["accuracy"]
    rho = result["all"]["spearman_proxy_oracle"]
    assert rho is None or -1.0 <= rho <= 1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="patch_size"):
        ProxyConfig(patch_size=3)
    with pytest.raises(ValueError, match="false_negatives"):
        ProxyConfig(false_negatives="none")
    with pytest.raises(ValueError, match="context_length"):
        ProxyConfig(context_length=8)


@pytest.mark.slow
def test_full_recipe_retrieves_heldout_captions():
    """Clean held-out combinations (held-out digit images): the right caption among the held-out ones, mostly among all 200."""
    _, stats = train_proxy_clip(ProxyConfig(), progress=False)
    assert stats["retrieval_top1_train"] >= 0.85, stats
    assert stats["retrieval_top1_heldout_among_heldout"] >= 0.85, stats
    assert stats["retrieval_top1_heldout"] >= 0.6, stats  # unseen captions lose some ties to seen ones
