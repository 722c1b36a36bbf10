"""Mixed precision: bf16 forward, float32 step math and log-probs, latents stored in bf16 so the ratio is exactly 1."""
from copy import deepcopy

import pytest
import torch

from _tiny import tiny_diffusion_pipeline, tiny_flow_pipeline
from genft.config import ConfigError
from genft.methods.dpok import DPOKConfig
from genft.precision import LossScaler, autocast_forward, compute_dtype, remove_autocast_forward, storage_dtype

PROMPTS = ["a red cat", "a blue dog", "the moon"]


def _bf16(pipe):
    autocast_forward(pipe.unet, "bf16", torch.device("cpu"))
    pipe.storage_dtype = storage_dtype("bf16")
    return pipe


@pytest.mark.parametrize("make", [tiny_diffusion_pipeline, tiny_flow_pipeline], ids=["diffusion", "flow"])
def test_bf16_rollout_then_rescore_gives_ratio_exactly_one(make):
    pipe = _bf16(make())
    traj = pipe.rollout(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(3)], num_inference_steps=4,
                        guidance_scale=3.0)
    assert traj.latents.dtype == torch.bfloat16  # stored in the storage dtype ...
    assert traj.log_probs.dtype == torch.float32  # ... scored in float32
    stochastic = 0
    with torch.no_grad():
        for k in range(traj.num_steps):
            step = pipe.rescore(traj, k)
            assert step.log_prob.dtype == torch.float32 and step.mean.dtype == torch.float32
            ratio = torch.exp(step.log_prob - traj.log_probs[:, k])
            assert torch.equal(ratio, torch.ones_like(ratio)), (k, ratio)
            stochastic += int(step.stochastic.any())
    assert stochastic > 0


def test_only_the_forward_is_autocast():
    pipe = tiny_diffusion_pipeline()
    unet = pipe.unet
    x, t, emb = torch.randn(2, 3, 8, 8), torch.tensor([10, 50]), pipe.encode_prompt(PROMPTS[:2])
    full = unet(x, t, encoder_hidden_states=emb).sample
    autocast_forward(unet, "bf16", torch.device("cpu"))
    raw = unet(x, t, encoder_hidden_states=emb).sample
    assert raw.dtype == torch.bfloat16 and next(unet.parameters()).dtype == torch.float32  # weights stay float32
    assert pipe.model_output(x, t, emb, None, 1.0).dtype == torch.float32  # what the step math sees
    assert torch.allclose(raw.float(), full, atol=0.1) and not torch.equal(raw.float(), full)
    with pytest.raises(ValueError, match="already"):
        autocast_forward(unet, "bf16", torch.device("cpu"))
    copy = deepcopy(unet)  # a copy (e.g. a method's fake-score net) runs its own weights, still autocast
    with torch.no_grad():
        for p in copy.parameters():
            p.mul_(0.5)
    copied = copy(x, t, encoder_hidden_states=emb).sample
    assert copied.dtype == torch.bfloat16 and not torch.allclose(copied.float(), raw.float(), atol=0.1)
    remove_autocast_forward(unet)
    assert torch.equal(unet(x, t, encoder_hidden_states=emb).sample, full)
    assert autocast_forward(unet, "no", torch.device("cpu")) is unet and "forward" not in unet.__dict__


def test_dtypes_per_setting():
    assert compute_dtype("no") is None and compute_dtype("fp16") is torch.float16
    assert storage_dtype("no") is None and storage_dtype("bf16") is torch.bfloat16
    assert storage_dtype("bf16", "float32") is torch.float32  # an explicit trajectory dtype wins
    with pytest.raises(ConfigError, match="mixed_precision"):
        DPOKConfig.from_dict({"mixed_precision": "fp8"})


def test_fp16_loss_scaler_skips_overflow_and_lowers_the_scale():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler("fp16", torch.device("cpu"))
    start = scaler.scale_value
    (scaler.scale((p * 2).sum())).backward()
    assert p.grad.item() == 2 * start
    scaler.unscale(opt)
    assert p.grad.item() == 2.0  # true gradient before clipping and finiteness checks
    scaler.step(opt)
    scaler.update()
    assert p.item() == pytest.approx(0.8)
    opt.zero_grad()
    p.grad = torch.tensor([float("inf")])
    scaler.unscale(opt)
    scaler.step(opt)  # skipped by the scaler
    scaler.update()
    assert p.item() == pytest.approx(0.8) and scaler.scale_value == start / 2
    off = LossScaler("bf16", torch.device("cpu"))
    loss = torch.tensor(3.0)
    assert off.scale(loss) is loss and not off.enabled and off.scale_value == 1.0


def test_trainer_runs_a_round_in_fp16_with_loss_scaling(tmp_path):
    from genft.trainer import Trainer

    c = DPOKConfig(output_dir=str(tmp_path), device="cpu", reward="jpeg_compressibility", eval_rewards=[], num_rounds=1,
                   prompts_per_round=2, samples_per_prompt=2, num_inference_steps=3, p_step=4, gradient_accumulation=1,
                   p_batch_size=4, progress=False, mixed_precision="fp16", learning_rate=1e-3)
    c.validate()
    trainer = Trainer(c, pipeline=tiny_diffusion_pipeline(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert trainer.scaler.enabled and trainer.pipeline.storage_dtype == torch.float16
    before = [p.detach().clone() for p in trainer.trainable]
    r = 0
    prompts = trainer.round_prompts(r)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    assert traj.latents.dtype == torch.float16 and traj.log_probs.dtype == torch.float32
    trainer.method.collect(traj, trainer.method.advantages(rewards, prompts), rewards)
    metrics = trainer.update(r)
    # Overflows at the initial loss scale (2^16) are skipped without counting as failures; the scale drops and steps follow.
    assert metrics["optimizer_steps"] + metrics["skipped_updates"] == 4 and metrics["optimizer_steps"] >= 1
    assert trainer.scaler.scale_value == 2.0**16 / 2 ** metrics["skipped_updates"] and trainer.consecutive_skips == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.trainable))
