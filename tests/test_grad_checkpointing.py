"""Gradient checkpointing recomputes activations in the backward pass and gives the same gradients."""
import pytest
import torch
from torch.testing import assert_close

from _tiny import tiny_diffusion_pipeline
from genft.lora import apply_lora
from genft.methods.dpok import DPOKConfig


def _grads(checkpointing: bool, lora: bool):
    """Gradients of a DPOK-shaped loss (re-scored log-prob of a stored step) and the activation elements kept for backward."""
    pipe = tiny_diffusion_pipeline()
    params = apply_lora(pipe.unet, rank=4, alpha=4.0) if lora else list(pipe.unet.parameters())
    if lora:
        with torch.no_grad():  # B starts at zero; move it so that every adapter parameter gets a gradient
            for n, p in pipe.unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    traj = pipe.rollout(["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                        guidance_scale=3.0)
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    saved = [0]

    def pack(t):  # checkpointed regions keep only their inputs; their inner activations never reach this hook
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -pipe.rescore(traj, 1).log_prob.mean()
    loss.backward()
    return [p.grad.clone() for p in params], saved[0]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_same_gradients_with_and_without_checkpointing(lora):
    plain, plain_saved = _grads(False, lora)
    ckpt, ckpt_saved = _grads(True, lora)
    assert ckpt_saved < 0.5 * plain_saved  # activations are recomputed in the backward pass instead of kept
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_trainer_switches_it_on(tmp_path):
    from genft.trainer import Trainer

    c = DPOKConfig(output_dir=str(tmp_path), device="cpu", reward="jpeg_compressibility", eval_rewards=[], progress=False,
                   gradient_checkpointing=True, finetune="lora")
    c.validate()
    trainer = Trainer(c, pipeline=tiny_diffusion_pipeline(), prompts=["a red cat"], eval_prompts=["a red cat"])
    assert trainer.pipeline.unet.is_gradient_checkpointing
    # With LoRA the reference is a view of the policy that switches checkpointing off inside its own calls
    # (tests/test_reference.py checks the gradients); with full fine-tuning it is a copy that never checkpoints.
    with trainer.reference_unet.active() as net:
        assert not net.is_gradient_checkpointing or not torch.is_grad_enabled()
    assert trainer.pipeline.unet.is_gradient_checkpointing
    full = Trainer(DPOKConfig(**{**c.to_dict(), "finetune": "full", "output_dir": str(tmp_path / "full")}),
                   pipeline=tiny_diffusion_pipeline(), prompts=["a red cat"], eval_prompts=["a red cat"])
    assert full.pipeline.unet.is_gradient_checkpointing and not full.reference_unet.is_gradient_checkpointing
    assert trainer.trainable and all(p.requires_grad for p in trainer.trainable)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.trainable}  # the optimiser holds the adapters only
