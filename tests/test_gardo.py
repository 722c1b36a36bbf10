"""GARDO: its pure pieces against hand-computed values, and its wiring over GRPO and DPOK on tiny models."""
import json
import math

import numpy as np
import pytest
import torch

import genft
from genft.config import ConfigError
from genft.gardo import (AdaptiveFraction, ReferenceResetTrigger, descending_ranks, diversity_advantages,
                         nearest_neighbour_distance, rank_uncertainty, uncertainty_gate)
from genft.methods.gardo import GARDODPOK, GARDOGRPO
from reward_models import RewardModel
from _tiny import tiny_diffusion_pipeline, tiny_flow_pipeline

PROMPTS = ["a red cat", "a blue dog"]


# ----- pure pieces ----------------------------------------------------------------------------------
def test_descending_ranks_best_is_one():
    torch.testing.assert_close(descending_ranks(torch.tensor([0.1, 0.5, 0.3])), torch.tensor([3.0, 1.0, 2.0]))


def test_rank_uncertainty_both_signs():
    proxy = torch.tensor([3.0, 2.0, 1.0, 0.0])  # ranks 1 2 3 4
    aux = [torch.tensor([0.0, 1.0, 2.0, 3.0]),  # ranks 4 3 2 1
           torch.tensor([0.0, 3.0, 2.0, 1.0])]  # ranks 4 1 2 3 -> mean aux ranks 4 2 2 2
    torch.testing.assert_close(rank_uncertainty(proxy, aux), torch.tensor([3.0, 0.0, -1.0, -2.0]))
    torch.testing.assert_close(rank_uncertainty(proxy, aux, "reference_code"), torch.tensor([-3.0, 0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one auxiliary"):
        rank_uncertainty(proxy, [])


def test_gate_takes_the_top_fraction_of_non_negative_uncertainty():
    u = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, -1.0])
    assert np.percentile([0, 1, 2, 3, 4], 80) == pytest.approx(3.2)  # the threshold the gate uses
    assert uncertainty_gate(u, 0.2).tolist() == [False, False, False, False, True, False]
    assert uncertainty_gate(torch.tensor([3.0, 0.0, -1.0, -2.0]), 0.5).tolist() == [True, False, False, False]
    assert not uncertainty_gate(torch.tensor([-1.0, -2.0]), 0.5).any()


def test_proxy_over_rating_is_what_gets_gated():
    """The proxy's favourite that the auxiliaries both rank last is the one flagged (default sign)."""
    proxy = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.4])
    aux = [torch.tensor([0.0, 0.8, 0.7, 0.6, 0.5]), torch.tensor([0.0, 0.7, 0.6, 0.5, 0.4])]  # ranks 5 1 2 3 4
    u = rank_uncertainty(proxy, aux)
    torch.testing.assert_close(u, torch.tensor([4.0, -4.0, -2.0, 0.0, 2.0]))
    assert uncertainty_gate(u, 0.2).tolist() == [True, False, False, False, False]
    assert uncertainty_gate(rank_uncertainty(proxy, aux, "reference_code"), 0.2).tolist() == [False, True, False, False, False]


def test_on_a_real_hack_the_default_sign_gates_the_hacked_images():
    """The sign check on the toy world: digits thickened into blobs (the ink hack) get a high proxy
    (truth + 3·ink) but a low auxiliary (the truth), and only `proxy_overrates` gates them."""
    import torch.nn.functional as F

    import reward_models
    from genft.toyworld.data import PALETTE, caption, render, train_combos
    from genft.toyworld.ink import INK_SIGMA

    combos = train_combos()[::4]
    g = torch.Generator().manual_seed(0)
    images, prompts = render(combos, g), [caption(*c) for c in combos]
    fg = torch.tensor([PALETTE[c.fg] for c in combos])[:, :, None, None]
    ink_mask = torch.exp(-((images - fg) ** 2).sum(1, keepdim=True) / (2 * INK_SIGMA**2))
    hacked = torch.rand(len(combos), generator=g) < 0.3
    for _ in range(4):
        ink_mask = torch.where(hacked[:, None, None, None], F.max_pool2d(ink_mask, 3, 1, 1), ink_mask)
    images = images * (1 - ink_mask) + fg * ink_mask
    truth, ink = reward_models.load("toy_oracle"), reward_models.load("toy_ink")
    proxy, aux = truth(images, prompts) + 3 * ink(images, prompts), truth(images, prompts)
    gated = {sign: uncertainty_gate(rank_uncertainty(proxy, [aux], sign), 0.2) for sign in ("proxy_overrates", "reference_code")}
    assert hacked.sum() >= 5 and gated["proxy_overrates"].sum() >= 3
    assert hacked[gated["proxy_overrates"]].all()  # every gated image is a hacked one
    assert not hacked[gated["reference_code"]].any()  # the released code's sign gates only clean ones


def test_adaptive_fraction_follows_the_uncertainty_range():
    f = AdaptiveFraction(initial=0.1, low=0.02, high=0.2, rate=0.1, window=2)
    assert f.update(torch.tensor([1.0, -3.0])) == pytest.approx(0.1)      # first round: no history
    assert f.update(torch.tensor([2.0, -1.0])) == pytest.approx(0.11)     # above max of [1]
    assert f.update(torch.tensor([1.5])) == pytest.approx(0.11)           # inside [1, 2]
    assert f.update(torch.tensor([0.5])) == pytest.approx(0.099)          # below min of [2, 1.5]
    for s in range(10, 30):
        f.update(torch.tensor([float(s)]))
    assert f.value == pytest.approx(0.2)                                  # clipped at the upper bound
    g = AdaptiveFraction()
    g.load_state_dict(f.state_dict())
    assert g.value == f.value and g.history == f.history == [28.0, 29.0]


def test_nearest_neighbour_distance_within_groups():
    c30, s30 = math.cos(math.pi / 6), math.sin(math.pi / 6)
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [c30, s30], [1.0, 1.0], [5.0, 5.0]])  # scales are normalised away
    d = nearest_neighbour_distance(feats, ["a", "a", "a", "b", "b"])
    torch.testing.assert_close(d, torch.tensor([1 - c30, 1 - s30, 1 - c30, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one sample"):
        nearest_neighbour_distance(feats[:3], ["a", "a", "b"])


def test_diversity_advantage_scales_only_above_mean_samples():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    d = torch.tensor([0.1, 0.5, 0.3, 0.0, 0.0])  # group a mean d = 0.3; group b all-equal images (mean 0)
    adv = diversity_advantages(r, ["a", "a", "a", "b", "b"], d, clip=5.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0 * 0.3 / 0.3, -2.0, 2.0]))
    d2 = torch.tensor([0.1, 0.2, 0.6, 0.0, 0.0])  # mean 0.3: the best sample is the most distinct -> x2
    torch.testing.assert_close(diversity_advantages(r, ["a"] * 3 + ["b"] * 2, d2, clip=1.5),
                               torch.tensor([-1.0, 0.0, 1.5, -1.5, 1.5]))
    torch.testing.assert_close(diversity_advantages(r, ["a"] * 3 + ["b"] * 2, d2, clip=5.0, std=2.0),
                               torch.tensor([-1.0, 0.0, 2.0, -2.0, 2.0]) / (2.0 + 1e-4))


def test_reference_reset_trigger():
    t = ReferenceResetTrigger(kl_threshold=1e-3, every=3)
    t.observe(5e-4)
    assert not t.should_reset(1)
    t.observe(2e-3)
    assert t.should_reset(2)
    t.mark_reset(2)
    assert not t.should_reset(4) and t.should_reset(5) and t.resets == 1
    off = ReferenceResetTrigger(kl_threshold=0.0, every=0)
    off.observe(10.0)
    assert not off.should_reset(100)


# ----- wiring ---------------------------------------------------------------------------------------
class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


BASE = dict(reward="toy_oracle", eval_rewards=[], num_rounds=1, prompts_per_round=2, samples_per_prompt=4,
            num_inference_steps=4, train_batch_size=4, gradient_accumulation=2, learning_rate=1e-3, kl_weight=0.1,
            clip_range=1e-2, progress=False, eval_images_per_prompt=2, seed=0, guidance_scale=1.0)
GARDO = dict(aux_rewards=["jpeg_compressibility"], diversity_features="pixels", diversity_feature_options={"size": 4},
             kl_fraction=0.2, kl_fraction_max=0.5)


def _config(tmp_path, method="gardo_grpo", **kw):
    extra = GARDO if method == "gardo_grpo" else {}
    return genft.load_config(**{**BASE, **extra, "method": method, "output_dir": str(tmp_path / "run"), **kw})


def _collect(trainer):
    prompts = trainer.round_prompts(0)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    trainer.method.collect(traj, trainer.method.advantages(rewards, prompts), rewards)
    return traj, rewards


def test_config_refuses_leaks_and_missing_auxiliaries(tmp_path):
    with pytest.raises(ConfigError, match="held-out"):
        _config(tmp_path, aux_rewards=["toy_oracle_accuracy"], eval_rewards=["toy_oracle_accuracy"])
    with pytest.raises(ConfigError, match="needs aux_rewards"):
        _config(tmp_path, aux_rewards=[])
    with pytest.raises(ConfigError, match="optimised reward"):
        _config(tmp_path, aux_rewards=["toy_oracle"])
    with pytest.raises(ConfigError, match="kl_fraction_min"):
        _config(tmp_path, kl_fraction=0.9)
    assert _config(tmp_path, aux_rewards=[], gated_kl=False).method == "gardo_grpo"


def test_gated_kl_is_the_mean_over_gated_samples(tmp_path):
    pipe = tiny_diffusion_pipeline()
    trainer = genft.Trainer(_config(tmp_path), pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    m = trainer.method
    assert isinstance(m, GARDOGRPO)
    traj, rewards = _collect(trainer)
    gate = m.fields["kl_gate"]
    assert gate.shape == (8,) and set(gate.unique().tolist()) <= {0.0, 1.0}
    # the diversity-aware advantage replaced GRPO's: below-mean samples keep r − mean_group (no std division)
    adv = m.fields["advantage"]
    for p in set(traj.prompts):
        idx = [i for i, q in enumerate(traj.prompts) if q == p]
        centred = rewards[idx].float() - rewards[idx].float().mean()
        below = centred < 0
        torch.testing.assert_close(adv[idx][below], centred[below].cpu())
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert m.kl_reduce(kl, {"kl_gate": torch.tensor([1.0, 0.0, 1.0, 0.0])}).item() == pytest.approx(2.0)
    assert m.kl_reduce(kl, {"kl_gate": torch.zeros(4)}).item() == 0.0


def test_all_parts_off_is_plain_grpo(tmp_path):
    off = dict(gated_kl=False, adaptive_reference=False, diversity_advantage=False, aux_rewards=[])
    losses = []
    for cfg in [_config(tmp_path, method="grpo"), _config(tmp_path, **off)]:
        trainer = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
        _collect(trainer)
        with torch.no_grad():
            for p in trainer.pipeline.unet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        batch = next(iter(trainer.method.minibatches(torch.Generator().manual_seed(0))))
        losses.append(trainer.method.loss(batch, 0)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_reference_is_reset_to_the_policy_and_checkpointed(tmp_path):
    pipe = tiny_diffusion_pipeline()
    cfg = _config(tmp_path, num_rounds=2, reference_reset_every=1, reference_kl_threshold=0.0, checkpoint_every=1)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    base_ref = {k: v.clone() for k, v in trainer.reference_unet.state_dict().items()}
    trainer.train()
    policy, ref = pipe.unet.state_dict(), trainer.reference_unet.state_dict()
    assert all(torch.equal(policy[k], ref[k]) for k in ref), "reference was not reset to the policy"
    assert any(not torch.equal(base_ref[k], ref[k]) for k in ref)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "reward_mean" in r]
    assert [r["reference_resets"] for r in rounds] == [1.0, 2.0]
    assert all("kl_fraction" in r and "nn_distance" in r for r in rounds)
    state = trainer.method.state_dict()["gardo"]
    assert state["trigger"]["resets"] == 2 and set(state["reference"]) == set(ref)


def test_kl_threshold_triggers_a_reset(tmp_path):
    pipe = tiny_flow_pipeline()
    cfg = _config(tmp_path, num_rounds=1, reference_reset_every=0, reference_kl_threshold=1e-30, gated_kl=False,
                  learning_rate=1e-2, gradient_accumulation=1)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    trainer.train()
    assert trainer.method.trigger.resets == 1


def test_gardo_dpok_stores_the_gate_per_transition_and_trains(tmp_path):
    pipe = tiny_diffusion_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = genft.load_config(method="gardo_dpok", reward="toy_oracle", eval_rewards=[], output_dir=str(tmp_path / "run"),
                            num_rounds=2, prompts_per_round=2, samples_per_prompt=4, num_inference_steps=4, p_step=2,
                            gradient_accumulation=1, p_batch_size=8, learning_rate=1e-3, kl_weight=0.1, progress=False,
                            eval_images_per_prompt=1, buffer_size=64, guidance_scale=1.0, advantage="group",
                            aux_rewards=["jpeg_compressibility"], diversity_features="pixels", kl_fraction=0.2, kl_fraction_max=0.5)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert isinstance(trainer.method, GARDODPOK)
    trainer.train()
    buf = trainer.method.buffer
    assert "kl_gate" in buf.data and buf.data["kl_gate"][: len(buf)].sum() > 0
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_resume_restores_the_reset_reference_and_the_controllers(tmp_path):
    cfg = _config(tmp_path, num_rounds=1, reference_reset_every=1, reference_kl_threshold=0.0, checkpoint_every=1)
    first = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    first.train()
    ckpt = tmp_path / "run" / "checkpoints" / "round_00001"
    cfg2 = _config(tmp_path, num_rounds=1, reference_reset_every=1, reference_kl_threshold=0.0, resume_from=str(ckpt),
                   output_dir=str(tmp_path / "resumed"))
    second = genft.Trainer(cfg2, pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert second.method.trigger.resets == 1
    assert second.method.fraction.history == first.method.fraction.history
    ref1, ref2 = first.reference_unet.state_dict(), second.reference_unet.state_dict()
    assert all(torch.equal(ref1[k], ref2[k]) for k in ref1)


@pytest.mark.parametrize("recipe", ["grpo_toyworld", "gardo_toyworld"])
def test_toyworld_recipes_are_valid_configs(recipe):
    from pathlib import Path

    cfg = genft.load_config(Path(__file__).parent.parent / "scripts" / "recipes" / f"{recipe}.yaml")
    assert cfg.method == {"grpo_toyworld": "grpo", "gardo_toyworld": "gardo_grpo"}[recipe]
    assert "toy_oracle_accuracy" in cfg.eval_rewards and cfg.reward == "toy_proxy_clip"
