"""ROCM: exact gradients through the fixed-noise consistency trajectory, the divergence term, checkpointing, Trainer/CLI runs."""
import copy
import json

import pytest
import torch
import yaml

import genft
from genft.config import ConfigError
from genft.methods.rocm import ROCM, ROCMConfig
from reward_models import RewardModel
from test_pipelines_consistency import tiny_consistency_pipeline

PROMPTS = ["a red cat", "a blue dog", "the moon", "a green cat"]


class Brightness(RewardModel):
    """Mean pixel value, differentiable."""

    name = "brightness"
    supports_grad = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def small_config(tmp_path, **kw):
    base = dict(method="rocm", model="toyworld-lcm", reward="brightness", eval_rewards=[], output_dir=str(tmp_path / "run"),
                num_rounds=2, prompts_per_round=2, samples_per_prompt=2, num_inference_steps=3, train_batch_size=2,
                learning_rate=1e-3, guidance_scale=2.0, progress=False, eval_images_per_prompt=2, eval_max_prompts=2,
                max_grad_norm=0.0, seed=0)
    base.update(kw)
    return genft.load_config(**base)


def _method(tmp_path, perturb: float = 0.0, **kw):
    """A ROCM method on a tiny LCM whose policy is `perturb`-far from the reference, with one collected rollout."""
    pipe = tiny_consistency_pipeline()
    reference = copy.deepcopy(pipe.unet).requires_grad_(False)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pipe.unet.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    method = ROCM(small_config(tmp_path, **kw), pipe, reference)
    method.attach(reward=Brightness(differentiable=True))
    traj = pipe.rollout(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=3, guidance_scale=2.0)
    method.collect(traj, None, None)
    return method, pipe, traj


def test_divergence_is_zero_at_init_and_the_unroll_reproduces_the_rollout(tmp_path):
    for name in ["kl", "hellinger", "tv", "chi2", "js"]:
        method, pipe, traj = _method(tmp_path, divergence=name)
        loss, metrics = method.loss(torch.arange(2), 0)
        assert metrics["divergence"] == 0.0, name
        torch.testing.assert_close(loss, -Brightness()(traj.images, traj.prompts).mean(), rtol=0, atol=1e-5)
    x_out, divs, stds = method.unroll(traj, method.records["noises"])
    torch.testing.assert_close(x_out, traj.latents[:, -1].float(), rtol=0, atol=1e-5)
    assert divs.shape == (2, 3) and torch.equal(stds, traj.stds)


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_loss_gradient_matches_a_finite_difference(tmp_path, divergence):
    method, pipe, _ = _method(tmp_path, perturb=0.02, divergence=divergence, divergence_weight=20.0)
    params = [p for p in pipe.unet.parameters()]
    state = method.generator.get_state()

    def loss_value():
        method.generator.set_state(state)  # the same JS normals every time
        loss, metrics = method.loss(torch.arange(2), 0)
        return loss, metrics

    loss, metrics = loss_value()
    assert metrics["divergence"] > 1e-4  # the regulariser is part of what is checked
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    h = 1e-3
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(h * g / norm)
        plus = loss_value()[0].item()
        for p, g in zip(params, grads):
            p.sub_(2 * h * g / norm)
        minus = loss_value()[0].item()
        for p, g in zip(params, grads):
            p.add_(h * g / norm)
    directional = (plus - minus) / (2 * h)
    assert directional == pytest.approx(norm.item(), rel=0.03), (directional, norm.item())


def test_checkpointing_gives_the_same_gradient_and_memory_flat_in_steps(tmp_path):
    def grads_and_saved(checkpointing: bool, steps: int):
        torch.manual_seed(0)
        method, pipe, _ = _method(tmp_path, perturb=0.02, gradient_checkpointing=checkpointing, num_inference_steps=steps)
        traj = pipe.rollout(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=steps, guidance_scale=2.0)
        method.collect(traj, None, None)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = method.loss(torch.arange(2), 0)
        grads = torch.autograd.grad(loss, list(pipe.unet.parameters()))
        return grads, sum(saved)

    plain, plain_bytes = grads_and_saved(False, 3)
    ckpt, ckpt_bytes = grads_and_saved(True, 3)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    _, plain_long = grads_and_saved(False, 6)
    _, ckpt_long = grads_and_saved(True, 6)
    # Without checkpointing every step's activations stay alive; with it only the reward's and per-step inputs do.
    assert plain_long > 1.5 * plain_bytes and ckpt_bytes < 0.1 * plain_bytes
    assert ckpt_long - ckpt_bytes < 0.05 * (plain_long - plain_bytes)


def test_short_run_changes_weights_raises_reward_and_logs_reward_queries(tmp_path):
    pipe = tiny_consistency_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = small_config(tmp_path, num_rounds=3, learning_rate=3e-3, divergence_weight=0.1)
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(differentiable=True), prompts=PROMPTS, eval_prompts=PROMPTS)
    result = trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    b, a = result["before"]["metrics"]["brightness"]["mean"], result["after"]["metrics"]["brightness"]["mean"]
    assert a > b + 0.01, f"held-out brightness did not rise: {b:.4f} -> {a:.4f}"
    rounds = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "reward_mean" in r]
    assert len(rounds) == 3 and all(r["gradient_reward_queries"] == 4 and r["divergence"] >= 0 for r in rounds)


def test_genft_train_cli_runs_rocm_on_a_consistency_folder(tmp_path, capsys):
    from genft.cli import main

    tiny_consistency_pipeline().save_pretrained(tmp_path / "lcm")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    recipe = dict(method="rocm", model=str(tmp_path / "lcm"), reward="test_rocm:Brightness", eval_rewards=[],
                  prompts=str(tmp_path / "prompts.txt"), eval_prompts=str(tmp_path / "prompts.txt"),
                  output_dir=str(tmp_path / "cli_run"), num_rounds=1, prompts_per_round=2, samples_per_prompt=2,
                  num_inference_steps=2, train_batch_size=4, eval_images_per_prompt=1, progress=False, device="cpu",
                  divergence="hellinger")
    (tmp_path / "rocm.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "rocm.yaml"), "divergence_weight=0.5"]) == 0
    assert "brightness" in capsys.readouterr().out  # the before/after summary table
    rounds = [json.loads(line) for line in (tmp_path / "cli_run" / "log.jsonl").read_text().splitlines()]
    assert [r["gradient_reward_queries"] for r in rounds if "reward_mean" in r] == [4]
    assert (tmp_path / "cli_run" / "checkpoints" / "final").is_dir()
    assert json.loads((tmp_path / "cli_run" / "config.json").read_text())["divergence_weight"] == 0.5


def test_rocm_refuses_a_diffusion_model_and_bad_settings_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="consistency generators, but model='toyworld' is a diffusion model"):
        genft.Trainer(small_config(tmp_path, model="toyworld", reward="toy_proxy_clip"))
    with pytest.raises(ConfigError, match="eta=1.5"):
        small_config(tmp_path, eta=1.5)
    with pytest.raises(ConfigError, match="divergence='wasserstein'"):
        small_config(tmp_path, divergence="wasserstein")
    with pytest.raises(ConfigError, match="multiple of"):
        small_config(tmp_path, train_batch_size=3)
    with pytest.raises(ConfigError, match="js_samples=3"):
        small_config(tmp_path, js_samples=3)
    with pytest.raises(ConfigError, match="differentiable"):
        genft.Trainer(small_config(tmp_path, reward="toy_oracle"), pipeline=tiny_consistency_pipeline(), prompts=PROMPTS,
                      eval_prompts=PROMPTS)
    cfg = small_config(tmp_path)
    assert isinstance(cfg, ROCMConfig) and cfg.divergence == "kl" and "divergence_weight" in ROCMConfig.field_help()


def test_collect_needs_the_reward(tmp_path):
    pipe = tiny_consistency_pipeline()
    method = ROCM(small_config(tmp_path), pipe, copy.deepcopy(pipe.unet))
    traj = pipe.rollout(PROMPTS[:2], generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    with pytest.raises(RuntimeError, match="attach"):
        method.collect(traj, None, None)
    with pytest.raises(ValueError, match="differentiable"):
        method.attach(reward=Brightness())
