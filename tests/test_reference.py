"""The reference network under LoRA is a view of the policy (adapters off, or GARDO's second frozen adapter),
never a copy: it computes exactly what a frozen copy of the base would, and leaves the policy as it found it."""
import copy

import pytest
import torch
from torch.testing import assert_close

import genft
from _tiny import tiny_diffusion_pipeline, tiny_unet
from genft.lora import apply_lora
from genft.reference import REFERENCE_ADAPTER, AdapterReference, add_reference_adapter, copy_policy_adapter, make_reference
from reward_models import RewardModel

PROMPTS = ["a red cat", "a blue dog"]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 60]), torch.randn(2, 5, 16, generator=g)


def _perturb_adapters(unet, seed=0, adapter="default"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n and f".{adapter}." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _lora_unet():
    unet = tiny_unet()
    base = copy.deepcopy(unet).eval()
    apply_lora(unet, rank=4, alpha=4.0)
    _perturb_adapters(unet)
    unet.train()
    return unet, base


def _state(unet):
    return [(n, p.requires_grad) for n, p in unet.named_parameters()], list(unet.active_adapters()), unet.training


def test_adapters_off_view_equals_the_base_and_restores_the_policy():
    unet, base = _lora_unet()
    ref = make_reference(unet, lora=True)
    assert isinstance(ref, AdapterReference) and ref.module is unet and ref.dtype == torch.float32
    x, t, emb = _inputs()
    before = _state(unet)
    with torch.no_grad():
        want = base(x, t, encoder_hidden_states=emb).sample
        got = ref(x, t, encoder_hidden_states=emb).sample
        policy = unet(x, t, encoder_hidden_states=emb).sample
    assert_close(got, want, rtol=0, atol=1e-6)
    assert (policy - want).abs().max() > 1e-3  # the adapters do change the policy
    assert _state(unet) == before


def test_view_keeps_a_graph_to_its_input_even_with_gradient_checkpointing():
    """ROCM differentiates through the reference's output: the gradient to x equals the base's, and no weight gets one."""
    unet, base = _lora_unet()
    unet.enable_gradient_checkpointing()
    ref = AdapterReference(unet)
    x, t, emb = _inputs()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref(xa, t, encoder_hidden_states=emb).sample.square().sum().backward()
    base(xb, t, encoder_hidden_states=emb).sample.square().sum().backward()
    assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in unet.parameters())
    assert unet.is_gradient_checkpointing and unet.training


def test_policy_gradient_is_unchanged_by_a_reference_call_in_between():
    """Policy forward, reference forward, then backward (GRPO's order): the adapters' gradients are the policy's alone."""
    unet, _ = _lora_unet()
    ref = AdapterReference(unet)
    x, t, emb = _inputs()
    unet(x, t, encoder_hidden_states=emb).sample.square().sum().backward()
    alone = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, encoder_hidden_states=emb).sample
    with torch.no_grad():
        ref(x, t, encoder_hidden_states=emb)
    out.square().sum().backward()
    mixed = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert alone and set(mixed) == set(alone)
    for n in alone:
        assert_close(mixed[n], alone[n])


def test_reference_adapter_is_a_frozen_snapshot_until_copied_again():
    unet, _ = _lora_unet()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    ref = AdapterReference(unet)
    add_reference_adapter(ref)
    assert ref.adapter == REFERENCE_ADAPTER and list(unet.active_adapters()) == ["default"]
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable  # the new adapter is frozen
    x, t, emb = _inputs()
    with torch.no_grad():
        snapshot = unet(x, t, encoder_hidden_states=emb).sample
        assert_close(ref(x, t, encoder_hidden_states=emb).sample, snapshot, rtol=0, atol=1e-6)
        _perturb_adapters(unet, seed=5)  # the policy trains on
        moved = unet(x, t, encoder_hidden_states=emb).sample
        assert_close(ref(x, t, encoder_hidden_states=emb).sample, snapshot, rtol=0, atol=1e-6)
        copy_policy_adapter(unet)  # GARDO's reset
        assert_close(ref(x, t, encoder_hidden_states=emb).sample, moved, rtol=0, atol=1e-6)


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


LORA_GARDO = dict(method="gardo_grpo", reward="toy_oracle", eval_rewards=[], num_rounds=2, prompts_per_round=2,
                  samples_per_prompt=4, num_inference_steps=4, train_batch_size=4, gradient_accumulation=2,
                  learning_rate=1e-2, kl_weight=0.1, clip_range=1e-2, progress=False, eval_images_per_prompt=1, seed=0,
                  guidance_scale=1.0, aux_rewards=["jpeg_compressibility"], diversity_features="pixels", kl_fraction=0.2,
                  kl_fraction_max=0.5, finetune="lora", lora_rank=4, reference_reset_every=1, reference_kl_threshold=0.0,
                  checkpoint_every=1)


def _adapter(unet, name):
    return {n.replace(f".{name}.", "."): p.detach().clone() for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n}


def test_trainer_makes_no_copy_under_lora_and_gardo_resets_the_reference_adapter(tmp_path):
    cfg = genft.load_config(**LORA_GARDO, output_dir=str(tmp_path / "run"))
    pipe = tiny_diffusion_pipeline()
    trainer = genft.Trainer(cfg, pipeline=pipe, reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    ref = trainer.reference_unet
    assert isinstance(ref, AdapterReference) and ref.module is pipe.unet and ref.adapter == REFERENCE_ADAPTER
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in pipe.unet.named_parameters() if ".default." in n}
    trainer.train()
    policy, reference = _adapter(pipe.unet, "default"), _adapter(pipe.unet, REFERENCE_ADAPTER)
    assert policy and all(torch.equal(policy[k], reference[k]) for k in policy), "reference adapter was not reset"
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)  # it moved off the base (B = 0)
    assert trainer.method.trigger.resets == 2

    resumed = genft.Trainer(genft.load_config(**{**LORA_GARDO, "resume_from": str(tmp_path / "run" / "checkpoints" / "round_00001")},
                                              output_dir=str(tmp_path / "again")),
                            pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    first_ref = torch.load(tmp_path / "run" / "checkpoints" / "round_00001" / "method_state.pt", weights_only=False)["gardo"]
    assert "reference" not in first_ref  # under LoRA the reference adapter travels in the network's own weights
    got = _adapter(resumed.pipeline.unet, REFERENCE_ADAPTER)
    assert set(got) == set(reference) and resumed.method.trigger.resets == 1


def test_a_method_without_a_kl_gets_no_reference_network(tmp_path, monkeypatch):
    """DI* (uses_reference = False) compares against its own teacher: the Trainer must not spend a network copy on it."""
    from genft.methods.diff_instruct_star import DiffInstructStar
    from genft.methods.grpo import GRPO

    assert DiffInstructStar.uses_reference is False
    monkeypatch.setattr(GRPO, "uses_reference", False)
    gardo_only = ("aux_rewards", "diversity_features", "kl_fraction", "kl_fraction_max", "reference_reset_every",
                  "reference_kl_threshold", "finetune", "lora_rank")
    plain = {k: v for k, v in LORA_GARDO.items() if k not in gardo_only}
    cfg = genft.load_config(**{**plain, "method": "grpo", "kl_weight": 0.0}, output_dir=str(tmp_path / "run"))
    trainer = genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert trainer.reference_unet is None
