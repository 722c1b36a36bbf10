"""LoRA through peft: only adapters train, the saved folder loads with diffusers' load_lora_weights, and a
`genft train` run with LoRA + EMA + bf16 + gradient checkpointing + sdpa goes end to end."""
import json

import pytest
import torch
import yaml
from torch.testing import assert_close

from _tiny import tiny_diffusion_pipeline, tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet
from genft.config import ConfigError
from genft.lora import TARGETS, apply_lora, default_targets, has_lora, load_lora, lora_family, save_lora
from genft.methods.dpok import DPOKConfig


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 60]), torch.randn(2, 5, 16, generator=g)


def _sd_pipeline():
    """A real diffusers StableDiffusionPipeline around the tiny components (base UNet, no adapters)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=3,
                        norm_num_groups=8, layers_per_block=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                                   unet=tiny_unet(), scheduler=tiny_scheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _one_update(unet, params):
    """One AdamW step on a DPOK-shaped loss: the re-scored log-prob of a stored rollout step."""
    pipe = tiny_diffusion_pipeline()
    pipe.unet = unet
    traj = pipe.rollout(["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                        guidance_scale=1.0)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = -pipe.rescore(traj, 0).log_prob.mean()
    loss.backward()
    opt.step()


def test_only_adapters_train_and_one_update_changes_them():
    unet = tiny_unet()
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = apply_lora(unet, rank=4, alpha=4.0)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in names) and len(names) == len(params)
    adapted = {n.split(".lora_")[0] for n in names}  # self- and cross-attention projections, output included
    for suffix in ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0"):
        assert any(a.endswith(suffix) for a in adapted), suffix
    lora_b = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_B" in n}
    assert all(torch.all(v == 0) for v in lora_b.values())  # the adapted model starts equal to the base
    _one_update(unet, params)
    after = dict(unet.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in lora_b.items())
    state = unet.state_dict()
    for k, v in base_before.items():  # peft renames adapted weights to `<name>.base_layer.weight`
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k


def test_saved_adapters_load_with_diffusers_load_lora_weights(tmp_path):
    unet = tiny_unet()
    params = apply_lora(unet, rank=4, alpha=8.0)
    _one_update(unet, params)
    save_lora(unet, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    x, t, emb = _inputs()
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=emb).sample
        base = tiny_unet()(x, t, encoder_hidden_states=emb).sample
        sd = _sd_pipeline()
        sd.load_lora_weights(str(tmp_path / "lora"))
        loaded = sd.unet(x, t, encoder_hidden_states=emb).sample
    assert (trained - base).abs().max() > 1e-4  # the update moved the output, so the comparison below means something
    assert_close(loaded, trained)
    # ... and back into a bare UNet for resuming or evaluation.
    fresh = tiny_unet()
    load_lora(fresh, tmp_path / "lora")
    with torch.no_grad():
        assert_close(fresh(x, t, encoder_hidden_states=emb).sample, trained)


def test_targets_per_family_and_refusals():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    unet = tiny_unet()
    assert lora_family(unet) == "unet" and default_targets(unet) == TARGETS["unet"]
    assert "ff.net.2" in default_targets(unet, include_ff=True)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    for model, family in ((sd3, "sd3"), (flux, "flux")):
        assert lora_family(model) == family
        params = apply_lora(model, rank=2, alpha=2.0)
        adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
        assert any(n.endswith("attn.add_q_proj") for n in adapted) and any(n.endswith("attn.to_q") for n in adapted)
        assert params and all(p.requires_grad for p in params) and has_lora(model)
    with pytest.raises(ValueError, match="finetune='lora'"):
        lora_family(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):  # peft names the target that matched nothing
        apply_lora(tiny_unet(), rank=2, alpha=2.0, targets=["no_such_module"])
    with pytest.raises(ConfigError, match="lora_targets"):
        DPOKConfig(lora_targets=["to_q"]).validate()
    with pytest.raises(ConfigError, match="lora_rank"):
        DPOKConfig(finetune="lora", lora_rank=0).validate()


def test_sd3_adapters_round_trip(tmp_path):
    from diffusers import SD3Transformer2DModel

    def make():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4)

    model = make()
    params = apply_lora(model, rank=2, alpha=2.0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    save_lora(model, tmp_path)
    fresh = make()
    load_lora(fresh, tmp_path)
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        assert_close(fresh(**args).sample, model(**args).sample)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_diffusion_pipeline().save_pretrained(d)
    return d


def test_genft_train_lora_ema_bf16_checkpointing_sdpa_end_to_end(tmp_path, model_dir):
    """`genft train` with every efficiency feature on; the exported adapters load into a diffusers pipeline."""
    from genft.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\nthe moon\n")
    cfg = dict(method="dpok", model=str(model_dir), reward="jpeg_compressibility", eval_rewards=[], prompts=str(prompts),
               eval_prompts=str(prompts), output_dir=str(tmp_path / "run"), num_rounds=2, prompts_per_round=2,
               samples_per_prompt=2, num_inference_steps=3, p_step=2, gradient_accumulation=1, p_batch_size=4,
               progress=False, eval_images_per_prompt=1, device="cpu", learning_rate=1e-3, finetune="lora", lora_rank=4,
               lora_alpha=4.0, ema_decay=0.9, mixed_precision="bf16", gradient_checkpointing=True,
               attention_backend="sdpa", cache_text_embeddings=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    rounds = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    updates = [r for r in rounds if "optimizer_steps" in r]
    assert len(updates) == 2 and all(r["optimizer_steps"] == 2 for r in updates)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in updates)
    assert (run / "evals" / "after").is_dir()
    final = run / "checkpoints" / "final"
    assert (final / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((run / "text_embeddings").glob("*/embeddings.safetensors"))
    sd = _sd_pipeline()
    sd.load_lora_weights(str(final / "lora"))
    assert sum("lora_B" in n for n, _ in sd.unet.named_parameters()) > 0


def test_checkpoint_resume_restores_adapters_and_ema(tmp_path):
    """A LoRA run's checkpoint holds the adapted weights (resume) and the adapters alone in diffusers' format."""
    from genft.trainer import Trainer

    def make(**kw):
        c = DPOKConfig(output_dir=str(tmp_path / "run"), device="cpu", reward="jpeg_compressibility", eval_rewards=[],
                       progress=False, finetune="lora", ema_decay=0.9, num_inference_steps=2, prompts_per_round=2,
                       samples_per_prompt=2, p_step=2, gradient_accumulation=1, p_batch_size=4, learning_rate=1e-2, **kw)
        c.validate()
        return Trainer(c, pipeline=tiny_diffusion_pipeline(), prompts=["a red cat", "a blue dog"], eval_prompts=["the moon"])

    first = make()
    prompts = first.round_prompts(0)
    traj, rewards = first.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    first.method.collect(traj, first.method.advantages(rewards, prompts), rewards)
    assert first.update(0)["optimizer_steps"] == 2
    path = first.save(tmp_path / "ckpt")
    assert (path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    resumed = make(resume_from=str(path))
    for a, b in zip(first.trainable, resumed.trainable):
        assert torch.equal(a, b)
    for a, b in zip(first.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    # The exported adapters are the EMA weights (what evaluation uses), loadable into a bare UNet.
    bare = tiny_unet()
    load_lora(bare, path / "lora")
    exported = {n: p for n, p in bare.named_parameters() if "lora_" in n}
    trained = [n for n, p in first.pipeline.unet.named_parameters() if p.requires_grad]
    for name, shadow in zip(trained, first.ema.shadow_params):
        assert_close(exported[name], shadow)
