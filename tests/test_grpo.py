"""GRPO (Flow-GRPO-style) on tiny diffusion and flow models: advantages, on-policy ratio, KL, updates, the CLI."""
import json

import pytest
import torch

import genft
from genft.config import ConfigError
from genft.methods.grpo import GRPO, group_advantages
from pipelines import gaussian_kl
from reward_models import RewardModel
from _tiny import tiny_diffusion_pipeline, tiny_flow_pipeline

PROMPTS = ["a red cat", "a blue dog"]


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _config(tmp_path, **kw):
    base = dict(method="grpo", reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"),
                num_rounds=1, prompts_per_round=2, samples_per_prompt=4, num_inference_steps=4, train_batch_size=4,
                gradient_accumulation=2, learning_rate=1e-3, kl_weight=0.1, clip_range=1e-2, progress=False,
                eval_images_per_prompt=2, seed=0, guidance_scale=2.0)
    base.update(kw)
    return genft.load_config(**base)


def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
    prompts = ["a"] * 3 + ["b"] * 3
    own = group_advantages(r, prompts, global_std=False, clip=5.0)
    sa, sb = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False), torch.tensor([10.0, 10.0, 16.0]).std(unbiased=False)
    expected = torch.cat([(torch.tensor([1.0, 2.0, 3.0]) - 2.0) / (sa + 1e-4), (torch.tensor([10.0, 10.0, 16.0]) - 12.0) / (sb + 1e-4)])
    torch.testing.assert_close(own, expected)
    glob = group_advantages(r, prompts, global_std=True, clip=5.0)
    s = r.std(unbiased=False)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / (s + 1e-4))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), ["a"] * 4, global_std=False, clip=1.0)
    raw = torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (torch.tensor([0.0, 0.0, 0.0, 1.0]).std(unbiased=False) + 1e-4)
    torch.testing.assert_close(clipped, raw.clamp(-1.0, 1.0))
    assert clipped.max().item() == 1.0


def test_config_refuses_bad_values_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt=1"):
        _config(tmp_path, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="multiple of"):
        _config(tmp_path, train_batch_size=3)
    with pytest.raises(ConfigError, match="noise_level=1.5"):
        _config(tmp_path, sampler="cps", noise_level=1.5)
    assert _config(tmp_path, num_inference_steps=10, timestep_fraction=0.99).num_train_steps == 9


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_first_minibatch_is_on_policy_and_kl_matches_closed_form(tmp_path, family):
    pipe = tiny_diffusion_pipeline() if family == "diffusion" else tiny_flow_pipeline()
    cfg = _config(tmp_path, kl_weight=0.5)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    method = trainer.method
    assert isinstance(method, GRPO)
    kwargs = method.rollout_kwargs()
    assert kwargs == ({"eta": 1.0} if family == "diffusion" else {"noise_level": 0.7, "sampler": "sde"})
    prompts = trainer.round_prompts(0)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    adv = method.advantages(rewards, prompts)
    method.collect(traj, adv, rewards)
    batch = next(iter(method.minibatches(torch.Generator().manual_seed(0))))
    loss, metrics = method.loss(batch, round_index=0)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_frac"] == 0.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)
    # ratio 1 and KL 0: the loss is −mean(A) over the minibatch
    assert loss.item() == pytest.approx(-batch["advantage"].mean().item(), abs=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())

    # perturb the policy: the KL term equals mean_dims(μθ − μref)²/(2σ²) of the rescored step
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sub = traj.select(batch["index"])
    k = batch["step"]
    with torch.no_grad():
        pol, ref = pipe.rescore(sub, k), pipe.rescore(sub, k, unet=trainer.reference_unet)
        _, metrics = method.loss(batch, round_index=0)
    std = pol.std.reshape(len(batch["index"]), -1)[:, 0].view(-1, 1, 1, 1)
    closed = ((pol.mean - ref.mean) ** 2 / (2 * std**2)).flatten(1).mean(1)
    assert closed.mean().item() > 0
    assert metrics["kl"] == pytest.approx(closed.mean().item(), rel=1e-4)
    torch.testing.assert_close(gaussian_kl(pol.mean, ref.mean, pol.std), closed)


def test_minibatches_cover_every_sample_at_every_trained_step(tmp_path):
    cfg = _config(tmp_path, num_inference_steps=5, timestep_fraction=0.8, inner_epochs=2)
    trainer = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    m = trainer.method
    prompts = trainer.round_prompts(0)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    m.collect(traj, m.advantages(rewards, prompts), rewards)
    seen = [(int(i), b["step"]) for b in m.minibatches(torch.Generator().manual_seed(1)) for i in b["index"]]
    assert sorted(seen) == sorted((i, k) for i in range(8) for k in range(4) for _ in range(2))
    assert m.gradient_accumulation_steps == 2 * 4


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_short_run_changes_weights(tmp_path, family):
    pipe = tiny_diffusion_pipeline() if family == "diffusion" else tiny_flow_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = _config(tmp_path, num_rounds=2)
    genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1]).train()
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "reward_mean" in r]
    # 8 samples / (4 per minibatch × 2 accumulated) = 1 optimiser step per round
    assert [r["optimizer_steps"] for r in rounds] == [1, 1]
    assert all(r["kl"] >= 0 for r in rounds)


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_cli_train_end_to_end(tmp_path, family):
    from genft.cli import main

    folder = tmp_path / "model"
    (tiny_diffusion_pipeline() if family == "diffusion" else tiny_flow_pipeline()).save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"method: grpo\nmodel: {folder}\nreward: jpeg_compressibility\neval_rewards: []\n"
                      f"prompts: {prompts}\neval_prompts: {prompts}\noutput_dir: {tmp_path / 'out'}\nnum_rounds: 1\n"
                      "prompts_per_round: 2\nsamples_per_prompt: 2\nnum_inference_steps: 3\ntrain_batch_size: 4\n"
                      "eval_images_per_prompt: 1\nprogress: false\nguidance_scale: 1.0\n")
    rc = main(["train", str(recipe), "learning_rate=1e-4"])
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("optimizer_steps") == 1 for r in records)
    assert (tmp_path / "out" / "checkpoints" / "final").is_dir()
