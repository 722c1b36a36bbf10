"""Weighted sums of rewards, background scoring, chunked rollouts, and reward options in the config."""
import json

import pytest
import torch

import genft
from genft.config import ConfigError
from pipelines import Trajectory
from reward_models import AsyncScorer, RewardModel, WeightedSum, score_with_components
from _tiny import tiny_diffusion_pipeline

PROMPTS = ["a red cat", "a blue dog"]


class Brightness(RewardModel):
    name = "brightness"
    supports_grad = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class Redness(RewardModel):
    name = "redness"
    supports_grad = True

    def score(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class Blocky(RewardModel):
    name = "blocky"

    def score(self, images, prompts):
        return images.round().mean(dim=(1, 2, 3))


def test_weighted_sum_equals_the_weighted_parts_and_reports_each():
    imgs = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["x"] * 5
    s = WeightedSum({"b": (Brightness(), 0.5), "r": (Redness(), -2.0)})
    total, parts = score_with_components(s, imgs, prompts)
    torch.testing.assert_close(parts["b"], Brightness()(imgs, prompts))
    torch.testing.assert_close(parts["r"], Redness()(imgs, prompts))
    torch.testing.assert_close(total, 0.5 * parts["b"] - 2.0 * parts["r"])
    torch.testing.assert_close(s(imgs, prompts), total)
    assert s.name == "0.5*b+-2*r"


def test_weighted_sum_differentiable_only_when_every_weighted_part_is():
    imgs = torch.rand(2, 3, 4, 4, requires_grad=True)
    s = WeightedSum({"b": (Brightness(differentiable=True), 1.0), "r": (Redness(differentiable=True), 1.0)}, differentiable=True)
    s(imgs, ["a", "b"]).sum().backward()
    expected = torch.autograd.grad((Brightness(differentiable=True)(imgs, ["a", "b"]) + Redness(differentiable=True)(imgs, ["a", "b"])).sum(), imgs)[0]
    torch.testing.assert_close(imgs.grad, expected)
    with pytest.raises(ValueError, match="no differentiable mode"):
        WeightedSum({"b": (Brightness(), 1.0), "k": (Blocky(), 1.0)}, differentiable=True)
    with pytest.raises(ValueError, match="differentiable=False"):
        WeightedSum({"b": (Brightness(), 1.0)}, differentiable=True)
    with pytest.raises(ValueError, match="finite"):
        WeightedSum({"b": (Brightness(), float("nan"))})


def test_non_differentiable_reward_builds_no_graph_and_chunks_agree():
    imgs = torch.rand(7, 3, 4, 4, requires_grad=True)
    out = Brightness()(imgs, ["p"] * 7)
    assert not out.requires_grad
    torch.testing.assert_close(Brightness(batch_size=3)(imgs, ["p"] * 7), out)
    torch.testing.assert_close(Brightness(dtype=torch.float64)(imgs, ["p"] * 7), out)
    with pytest.raises(ValueError, match="blocky.*no differentiable mode"):
        Blocky(differentiable=True)
    with pytest.raises(ValueError, match="batch_size"):
        Brightness(batch_size=0)


def test_async_scorer_matches_direct_scoring_and_copies_its_input():
    imgs = torch.rand(4, 3, 4, 4)
    with AsyncScorer(WeightedSum({"b": (Brightness(), 1.0), "r": (Redness(), 1.0)})) as scorer:
        fut = scorer.submit(imgs, ["a"] * 4)
        expected = Brightness()(imgs, ["a"] * 4) + Redness()(imgs, ["a"] * 4)
        imgs.zero_()  # the scorer works on its own copy
        total, parts = fut.result()
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"b", "r"}


def test_trajectory_cat_of_chunks_equals_one_rollout():
    pipe = tiny_diffusion_pipeline()
    prompts = ["a red cat", "a blue dog", "the moon"]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    whole = pipe.rollout(prompts, generator=gens(), num_inference_steps=3, guidance_scale=2.0, eta=1.0)
    g = gens()
    parts = [pipe.rollout(prompts[:2], generator=g[:2], num_inference_steps=3, guidance_scale=2.0, eta=1.0),
             pipe.rollout(prompts[2:], generator=g[2:], num_inference_steps=3, guidance_scale=2.0, eta=1.0)]
    joined = Trajectory.cat(parts)
    assert joined.prompts == prompts
    for name in ["latents", "log_probs", "images", "prompt_embeds"]:
        torch.testing.assert_close(getattr(joined, name), getattr(whole, name))
    with pytest.raises(ValueError, match="same settings"):
        Trajectory.cat([parts[0], pipe.rollout(prompts[:1], generator=g[:1], num_inference_steps=2, eta=1.0)])


def _config(tmp_path, **kw):
    base = dict(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"), num_rounds=1,
                prompts_per_round=2, samples_per_prompt=3, num_inference_steps=3, p_step=1, gradient_accumulation=1,
                p_batch_size=4, progress=False, eval_images_per_prompt=1, seed=0, buffer_size=32)
    base.update(kw)
    return genft.load_config(**base)


def test_chunked_async_rollout_gives_the_same_batch_and_logs_reward_parts(tmp_path):
    reward = WeightedSum({"brightness": (Brightness(), 1.0), "redness": (Redness(), 0.5)})
    results = []
    for i, kw in enumerate([{}, {"rollout_chunk_size": 4, "async_reward": True}]):
        trainer = genft.Trainer(_config(tmp_path / str(i), **kw), pipeline=tiny_diffusion_pipeline(), reward=reward,
                                prompts=PROMPTS, eval_prompts=PROMPTS[:1])
        prompts = trainer.round_prompts(0)
        gens = [torch.Generator().manual_seed(j) for j in range(len(prompts))]
        results.append(trainer.sample_and_score(prompts, gens))
        assert set(trainer.last_reward_parts) == {"brightness", "redness"}
    (t0, r0), (t1, r1) = results
    torch.testing.assert_close(t1.latents, t0.latents)
    torch.testing.assert_close(t1.log_probs, t0.log_probs)
    torch.testing.assert_close(r1, r0)


def test_reward_mapping_and_options_in_config(tmp_path):
    cfg = _config(tmp_path, reward={"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.1},
                  reward_options={"jpeg_compressibility": {"quality": 80}})
    trainer = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert isinstance(trainer.reward, WeightedSum)
    assert trainer.reward.parts["jpeg_compressibility"].quality == 80
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "reward_mean" in r]
    assert "reward/jpeg_compressibility" in rounds[0] and "reward/jpeg_incompressibility" in rounds[0]
    evals = [r for r in records if r.get("event") == "eval"]
    assert "eval/jpeg_incompressibility" in evals[0]
    with pytest.raises(ConfigError, match="reward_options"):
        _config(tmp_path, reward_options={"clip_scor": {"device": "cpu"}})
    with pytest.raises(ConfigError, match=r"reward\['a'\]"):
        _config(tmp_path, reward={"a": "heavy"})
    with pytest.raises(ConfigError, match="mapping"):
        _config(tmp_path, reward_options=["x"])


def test_config_can_score_through_a_reward_server(tmp_path):
    """The README's recipe: reward=reward_models.client:RemoteReward with its url/token in reward_options."""
    from reward_models.server import RewardServer

    token_file = tmp_path / "token"
    with RewardServer("jpeg_compressibility", token="t" * 32) as server:
        token_file.write_text(server.token)
        spec = "reward_models.client:RemoteReward"
        cfg = _config(tmp_path, reward=spec, reward_options={spec: {"url": server.url, "token_file": str(token_file)}})
        trainer = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
        prompts = trainer.round_prompts(0)
        traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(j) for j in range(len(prompts))])
    from reward_models import JpegCompressibility

    torch.testing.assert_close(rewards, JpegCompressibility()(traj.images, prompts))
