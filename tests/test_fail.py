"""FAIL (PD and PG): pure losses, the FPO ratio, expert groups, config refusals, pathwise gradients and a short run."""
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import genft
import genft.trainer as trainer_mod
from genft.config import ConfigError
from genft.fail_math import (cfm_losses, discriminator_loss, fpo_log_ratio, fpo_policy_loss, gail_reward, generator_loss,
                             gradient_penalty, group_advantages, one_step_reconstruction, prompt_groups, velocity_kl)
from genft.methods._discriminator import build_discriminator
from genft.methods._expert import TOY_STYLES, render_style, style_masks
from reward_models import RewardModel
from _tiny import tiny_flow_pipeline

PROMPTS = ["a red cat", "a blue dog"]


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture
def expert_folder(tmp_path):
    """16 reddish 8x8 expert images with a blue square (a distribution far from the tiny model's samples)."""
    folder = tmp_path / "experts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        a = np.zeros((8, 8, 3), np.int64)
        a[..., 0] = 230
        a[2:6, 2:6, 2] = 200
        a = np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"e{i:02d}.png")
    return folder


def _config(tmp_path, expert, **kw):
    base = dict(method="fail", model="unused", reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"),
                num_rounds=2, prompts_per_round=2, samples_per_prompt=4, num_inference_steps=4, learning_rate=1e-3,
                progress=False, eval_images_per_prompt=2, expert_data=str(expert), guidance_scale=2.0, seed=0,
                disc_warmup_rounds=0, train_batch_size=4)
    base.update(kw)
    return genft.load_config(**base)


def _trainer(tmp_path, expert, **kw):
    return genft.Trainer(_config(tmp_path, expert, **kw), pipeline=tiny_flow_pipeline(), reward=Brightness(),
                         prompts=PROMPTS, eval_prompts=PROMPTS[:1])


def _collect(trainer, round_index=0):
    prompts = trainer.round_prompts(round_index)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    trainer.method.collect(traj, trainer.method.advantages(rewards, prompts), rewards)
    return traj


# ----- pure math ------------------------------------------------------------------------------------
def test_discriminator_and_generator_losses_match_hand_values():
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    expected = (sp(0.0) + sp(-2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert generator_loss(torch.tensor([0.0, 3.0])).tolist() == pytest.approx([math.log(2), sp(-3.0)], rel=1e-6)
    d = torch.sigmoid(torch.tensor(0.7)).item()
    logits = torch.tensor([0.7])
    assert gail_reward(logits, "gail").item() == pytest.approx(-math.log(1 - d), rel=1e-6)
    assert gail_reward(logits, "airl").item() == pytest.approx(math.log(d) - math.log(1 - d), rel=1e-6)
    assert gail_reward(logits, "log_d").item() == pytest.approx(math.log(d), rel=1e-6)
    with pytest.raises(ValueError, match="reward form"):
        gail_reward(logits, "wgan")


def test_gradient_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.tensor([1.0, -2.0, 0.5])
    x = torch.randn(4, 3, requires_grad=True)
    assert gradient_penalty(x @ w, x).item() == pytest.approx(float(w @ w), rel=1e-6)


def test_group_advantages_count_the_expert_in_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    expert = torch.tensor([4.0, 13.0])
    adv, expert_adv = group_advantages(rewards, groups, expert, eps=0.0)
    g0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g1 = torch.tensor([10.0, 10.0, 13.0])
    z0, z1 = (g0 - g0.mean()) / g0.std(unbiased=False), (g1 - g1.mean()) / g1.std(unbiased=False)
    assert adv.tolist() == pytest.approx(z0[:3].tolist() + z1[:2].tolist(), rel=1e-6)
    assert expert_adv.tolist() == pytest.approx([z0[3].item(), z1[2].item()], rel=1e-6)
    # without the expert, the same samples normalise within themselves only
    alone, none = group_advantages(rewards, groups, None, eps=1e-8)
    assert none is None and alone[3:].abs().max() < 1e-6
    distinct, group_of = prompt_groups(["b", "a", "b"])
    assert distinct == ["b", "a"] and group_of.tolist() == [0, 1, 0]


def test_fpo_ratio_clamp_and_clipped_surrogate():
    old, new = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 0.9, 5.0])
    assert fpo_log_ratio(old, new).tolist() == pytest.approx([0.0, 0.1, -3.0], abs=1e-6)
    adv = torch.tensor([1.0, 1.0, -1.0])
    r = math.exp(0.1)
    expected = [-1.0, max(-r, -(1 + 0.01)), max(math.exp(-3.0), 1 - 0.01)]
    assert fpo_policy_loss(old, new, adv, clip_range=0.01).tolist() == pytest.approx(expected, rel=1e-6)


def test_one_step_reconstruction_is_exact_for_the_true_velocity_and_linear_in_its_error():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s, sn = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.3, 0.0])
    assert torch.allclose(one_step_reconstruction(x0, eps, s, sn, eps - x0), x0, atol=1e-5)
    err = torch.randn_like(x0)
    got = one_step_reconstruction(x0, eps, s, sn, eps - x0 + err)
    scale = ((sn - s) / (1 - sn)).view(-1, 1, 1, 1)
    assert torch.allclose(got, x0 + scale * err, atol=1e-5)
    assert cfm_losses(eps - x0 + 1.0, x0, eps).tolist() == pytest.approx([1.0] * 3)
    assert velocity_kl(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_toy_styles_differ_from_the_plain_strokes():
    masks = torch.zeros(1, 16, 16)
    masks[0, 4:12, 7:9] = 1.0
    assert style_masks(masks, "bold").sum() > masks.sum()
    assert style_masks(masks * 0.5, "thin").sum() < (masks * 0.5).sum()
    assert not torch.equal(style_masks(masks, "italic"), masks)
    for style in TOY_STYLES:
        images = render_style([(7, "red", "blue")] * 2, style, torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


# ----- config ---------------------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(trainer_mod, "load_pipeline", refuse)


def test_missing_or_empty_expert_folder_is_refused_before_any_model_loads(tmp_path, no_model_loading):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ConfigError, match=r"expert_data='.*no_such_folder' does not exist.*point expert_data at a folder"):
        genft.load_config(method="fail", expert_data=str(missing), output_dir=str(tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=r"expert_data='.*empty' holds no images"):
        genft.load_config(method="fail", expert_data=str(empty), output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"expert_data='toyworld:wavy'.*toyworld:bold"):
        genft.load_config(method="fail", expert_data="toyworld:wavy", output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"discriminator='resnet'.*cnn"):
        genft.load_config(method="fail", discriminator="resnet", output_dir=str(tmp_path / "run"))


def test_config_round_trips_through_yaml(tmp_path, expert_folder):
    cfg = _config(tmp_path, expert_folder, variant="pg", pd_mode="ode", kl_weight=0.05)
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert genft.load_config(path).to_dict() == cfg.to_dict()


# ----- the method on a tiny flow model --------------------------------------------------------------
def test_pg_ratio_is_exactly_one_on_the_first_update_and_the_expert_joins_each_group(tmp_path, expert_folder):
    trainer = _trainer(tmp_path, expert_folder, variant="pg", kl_weight=0.1)
    traj = _collect(trainer)
    data = trainer.method.data["batch"]
    groups = len(set(traj.prompts))
    assert data["x0"].shape[0] == traj.batch_size + groups  # one expert sample per prompt group
    adv = data["advantages"]
    gen_adv, expert_adv = adv[: traj.batch_size], adv[traj.batch_size:]
    _, group_of = prompt_groups(traj.prompts)
    for g in range(groups):  # standardised over (group samples + expert): zero mean, unit variance
        members = torch.cat([gen_adv[group_of == g], expert_adv[g : g + 1]])
        assert members.mean().abs() < 1e-4 and members.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    for batch in trainer.method.minibatches(trainer.generator):
        loss, metrics = trainer.method.loss(batch, 0)
        assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
        assert metrics["kl"] == 0.0
        loss.backward()
    grads = [p.grad for p in trainer.pipeline.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["one_step", "ode"])
def test_pd_gradients_reach_the_velocity_model(tmp_path, expert_folder, mode):
    trainer = _trainer(tmp_path, expert_folder, variant="pd", pd_mode=mode, pd_steps=3, kl_weight=0.1)
    _collect(trainer)
    batch = next(iter(trainer.method.minibatches(trainer.generator)))
    loss, metrics = trainer.method.loss(batch, 0)
    loss.backward()
    unet_grads = [p.grad for p in trainer.pipeline.unet.parameters() if p.grad is not None]
    assert unet_grads and sum(g.abs().sum() for g in unet_grads) > 0
    assert all(p.grad is None for p in trainer.method.discriminator.parameters())  # D is frozen in generator steps
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-10)


def test_pd_ode_mode_differentiates_the_pipelines_own_euler_sampler(tmp_path, expert_folder):
    from torchdiffeq import odeint

    pipe = tiny_flow_pipeline()
    emb = pipe.encode_prompt(["a red cat"])
    noise = torch.randn(1, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    traj = pipe.rollout(["a red cat"], latents=noise, num_inference_steps=3, guidance_scale=1.0, sampler="ode")
    grid = pipe.sigmas(3)
    x = odeint(lambda s, y: pipe.model_output(y, s, emb, None, 1.0), noise, grid, method="euler")[-1]
    assert torch.allclose(x, traj.latents[:, -1].float(), atol=1e-5)


@pytest.mark.parametrize("variant", ["pd", "pg"])
def test_short_run_moves_the_generator_toward_the_expert_folder(tmp_path, expert_folder, variant):
    from genft.features import load_images

    expert = load_images(sorted(expert_folder.glob("*.png")), (8, 8))
    pipe = tiny_flow_pipeline()

    def distance():
        gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
        with torch.no_grad():
            images = pipe.sample(PROMPTS * 4, generator=gens, num_inference_steps=4, guidance_scale=2.0, noise_level=0.0)
        return (images.mean((0, 2, 3)) - expert.mean((0, 2, 3))).norm().item()

    before_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = distance()
    cfg = _config(tmp_path, expert_folder, variant=variant, num_rounds=6, disc_steps=4, learning_rate=3e-3)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    trainer.train()
    assert any(not torch.equal(v, before_weights[k]) for k, v in pipe.unet.state_dict().items())
    after = distance()
    assert after < 0.8 * before, (before, after)


def test_captioned_experts_give_a_prompt_conditioned_discriminator(tmp_path, expert_folder):
    assert not _trainer(tmp_path, expert_folder).method.conditional
    with pytest.raises(ConfigError, match="disc_condition='prompt' needs a caption for every expert"):
        _trainer(tmp_path, expert_folder, disc_condition="prompt")
    for i, f in enumerate(sorted(expert_folder.glob("*.png"))):
        f.with_suffix(".txt").write_text(PROMPTS[i % 2])
    trainer = _trainer(tmp_path, expert_folder, variant="pg", num_rounds=1)
    assert trainer.method.conditional and trainer.method.discriminator.text_dim == 16
    images, captions = trainer.method.expert.sample(["a blue dog", "a red cat"], (8, 8), torch.Generator().manual_seed(0))
    assert captions == ["a blue dog", "a red cat"] and images.shape == (2, 3, 8, 8)
    trainer.train()  # D and the PG rewards read each expert's own caption


def test_discriminator_backbones_are_pluggable():
    d = build_discriminator("cnn", {"width": 8})
    assert d(torch.rand(3, 3, 8, 8)).shape == (3,)
    d = build_discriminator("genft.methods._discriminator:CNNBackbone", {"width": 8}, hidden=16)
    assert d(torch.rand(2, 3, 16, 16)).shape == (2,)
    with pytest.raises(ConfigError, match="does not take"):
        build_discriminator("cnn", {"depth": 3})


def test_discriminator_state_survives_a_checkpoint(tmp_path, expert_folder):
    trainer = _trainer(tmp_path, expert_folder, variant="pd", num_rounds=1)
    trainer.train()
    state = torch.load(tmp_path / "run" / "checkpoints" / "final" / "method_state.pt", weights_only=True)
    fresh = _trainer(tmp_path / "again", expert_folder, variant="pd").method
    fresh.load_state_dict(state)
    assert fresh.rounds_seen == 1
    for a, b in zip(fresh.discriminator.state_dict().values(), trainer.method.discriminator.state_dict().values()):
        assert torch.equal(a, b)


def test_clip_backbone_passes_gradients_to_the_images(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": True,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(tmp_path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    d = build_discriminator("clip", {"model": str(tmp_path)}, text_dim=4)
    assert [n for n, p in d.named_parameters() if p.requires_grad and n.startswith("backbone.")] == []  # frozen tower
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits = d(images, torch.randn(2, 4))
    logits.sum().backward()
    assert logits.shape == (2,) and images.grad.abs().sum() > 0
