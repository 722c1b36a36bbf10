"""The model families users run (SD 1.5/2.1, SDXL, SD3, FLUX, LCM), each loaded through one `pipelines.load` entry.

Every folder is written by the real diffusers pipeline class (StableDiffusionXLPipeline(...).save_pretrained,
...) from tiny components of the exact classes, so it is laid out exactly as a downloaded model. Per family:
the deterministic sampler matches diffusers' own pipeline bit for bit, rollouts record float32 log-probs
that re-scoring reproduces (also after select/cat), one policy-gradient step changes the weights, and a
save/load round trip reproduces the samples.
"""
import json

import diffusers
import pytest
import torch

import genft
import pipelines
from genft.models import load_pipeline
from pipelines import ConsistencyPipeline, DiffusionPipeline, FlowMatchPipeline, Trajectory, detect_family
from pipelines._flux import image_ids, pack_latents, unpack_latents
from pipelines._text import pack, unpack
from reward_models import RewardModel
from _tiny_real import LOAD_KW, T5_LEN, save_family

PROMPTS = ["a red cat on the moon", "a blue dog", "the green 7"]
FAMILY = {"sd15": "diffusion", "sd21": "diffusion", "sdxl": "diffusion", "sd3": "flow", "sd3-no-t5": "flow", "flux": "flow",
          "flux-schnell": "flow", "lcm": "consistency"}
CLASS = {"diffusion": DiffusionPipeline, "flow": FlowMatchPipeline, "consistency": ConsistencyPipeline}
SOURCE = {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
          "sd3": "StableDiffusion3Pipeline", "sd3-no-t5": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux-schnell": "FluxPipeline",
          "lcm": "LatentConsistencyModelPipeline"}


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _rollout_kwargs(name):
    """A stochastic rollout per family: DDIM η = 1, the Flow-GRPO SDE, the LCM chain."""
    if FAMILY[name] == "flow":
        return {"noise_level": 0.8, "guidance_scale": 3.5 if name == "flux" else 3.0}
    if name == "lcm":
        return {"guidance_scale": 3.0}
    return {"eta": 1.0, "guidance_scale": 3.0}


@pytest.fixture(scope="module", params=list(FAMILY))
def saved(request, tmp_path_factory):
    """(name, folder) of a tiny model saved by its real diffusers pipeline class."""
    path = tmp_path_factory.mktemp(request.param)
    save_family(request.param, path)
    return request.param, path


def test_one_registry_entry_per_family_loads_the_diffusers_folder(saved):
    name, path = saved
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == SOURCE[name] and SOURCE[name] in pipelines.REGISTRY
    pipe = pipelines.load(str(path), device="cpu", **LOAD_KW[name])
    assert type(pipe) is CLASS[FAMILY[name]] and pipe.family == FAMILY[name] == detect_family(str(path))
    if name in ("sdxl", "sd3", "sd3-no-t5", "flux", "flux-schnell"):
        assert pipe.text_encoder_2 is not None and pipe.source_class == SOURCE[name]
    if name.startswith("sd3"):
        assert (pipe.text_encoder_3 is None) == (name == "sd3-no-t5")
    # genft's trainer resolves a model path the same way
    again = load_pipeline(str(path), torch.device("cpu")) if not LOAD_KW[name] else None
    assert again is None or type(again) is type(pipe)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sd3", "sd3-no-t5", "flux", "flux-schnell"])
def test_deterministic_sampler_matches_the_diffusers_pipeline(name, tmp_path):
    """DDIM η = 0 / the Euler ODE from the same x_T give diffusers' own pipeline output exactly (conditioning, schedule, ids)."""
    save_family(name, tmp_path)
    pipe = pipelines.load(str(tmp_path), **LOAD_KW[name])
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3-no-t5" else {}
    hf = getattr(diffusers, pipe.source_class).from_pretrained(str(tmp_path), **no_t5)
    x = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=3, output_type="latent")
    if FAMILY[name] == "diffusion":  # diffusers with our DDIM scheduler; negative_prompt=None is SDXL's zeroed uncond
        hf.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        ours = pipe.rollout(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, eta=0.0, latents=x).latents[:, -1]
        ref = hf(PROMPTS[:2], latents=x, guidance_scale=3.0, eta=0.0, **kw).images
    elif name.startswith("sd3"):
        ours = pipe.rollout(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, sampler="ode", latents=x).latents[:, -1]
        ref = hf(PROMPTS[:2], latents=x, guidance_scale=3.0, max_sequence_length=T5_LEN, **kw).images
    else:  # FLUX: dev's guidance embedding; schnell with true CFG on the empty prompt
        guide = {"guidance_scale": 3.5} if name == "flux" else {"true_cfg_scale": 3.5, "negative_prompt": ["", ""]}
        ours = pipe.rollout(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.5, sampler="ode", latents=x).latents[:, -1]
        ref = hf(PROMPTS[:2], latents=pack_latents(x), max_sequence_length=T5_LEN, height=8, width=8, **guide, **kw).images
        ref = unpack_latents(ref, 8, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_rollout_rescore_update_save_and_load(saved, tmp_path):
    name, path = saved
    pipe = pipelines.load(str(path), **LOAD_KW[name])
    kw = _rollout_kwargs(name)
    traj = pipe.rollout(PROMPTS, generator=_gens(0, 3), num_inference_steps=3, **kw)
    assert traj.latents.dtype == pipe.latent_dtype and traj.log_probs.dtype == torch.float32
    assert traj.log_probs.shape == (3, 3) and traj.images.shape[:2] == (3, 3) and torch.isfinite(traj.log_probs).all()
    stochastic = [k for k in range(traj.num_steps) if traj.stds[k] > 0]
    assert stochastic, "the rollout took no stochastic step"
    with torch.no_grad():
        for k in range(traj.num_steps):
            torch.testing.assert_close(pipe.rescore(traj, k).log_prob, traj.log_probs[:, k], rtol=0, atol=1e-5)
        # the conditioning (pooled embeds, time ids) rides along through select/cat
        joined = Trajectory.cat([traj.select([2]), traj.select([0, 1])])
        torch.testing.assert_close(pipe.rescore(joined, stochastic[0]).log_prob, traj.log_probs[[2, 0, 1], stochastic[0]],
                                   rtol=1e-5, atol=1e-5)

    # one policy-gradient step: advantage-weighted log-prob of the stored transitions
    model = pipe.unet
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    advantages = torch.tensor([1.0, -0.5, -0.5])
    loss = -(advantages * pipe.rescore(traj, stochastic[0]).log_prob).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no weight changed"
    with torch.no_grad():
        moved = pipe.rescore(traj, stochastic[0]).log_prob
    assert not torch.allclose(moved, traj.log_probs[:, stochastic[0]])

    # save in the same diffusers layout and load back through the same entry: same samples
    pipe.save_pretrained(tmp_path / "tuned")
    index = json.loads((tmp_path / "tuned" / "model_index.json").read_text())
    original = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == SOURCE[name] and index["scheduler"] == original["scheduler"]  # e.g. SDXL keeps Euler
    again = pipelines.load(str(tmp_path / "tuned"), **LOAD_KW[name])
    a = pipe.rollout(PROMPTS[:2], generator=_gens(7, 2), num_inference_steps=3, **kw)
    b = again.rollout(PROMPTS[:2], generator=_gens(7, 2), num_inference_steps=3, **kw)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_bfloat16_storage_keeps_float32_log_probs_that_rescore(name, tmp_path):
    """Latents stored in bfloat16 (float32 or bfloat16 weights): rescoring the stored samples reproduces the float32 log-probs."""
    save_family(name, tmp_path)
    for kw in ({"storage_dtype": torch.bfloat16}, {"dtype": torch.bfloat16}):
        pipe = pipelines.load(str(tmp_path), **kw, **LOAD_KW[name])
        traj = pipe.rollout(PROMPTS[:2], generator=_gens(0, 2), num_inference_steps=2, **_rollout_kwargs(name))
        assert traj.latents.dtype == torch.bfloat16 and traj.log_probs.dtype == torch.float32
        assert traj.prompt_embeds.shape[-1] == pipe.prompt_embed_dim
        with torch.no_grad():
            for k in range(traj.num_steps):
                torch.testing.assert_close(pipe.rescore(traj, k).log_prob, traj.log_probs[:, k], rtol=0, atol=1e-5)


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_dpok_update_through_the_trainer(name, tmp_path):
    """genft's DPOK on a multi-encoder model: its replay buffer carries the packed conditioning; ratio 1, weights move.

    The Trainer loads the folder itself, at the config's `resolution` and `max_sequence_length`."""
    save_family(name, tmp_path / "model")
    config = genft.load_config(**LOAD_KW[name],
        model=str(tmp_path / "model"), reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"),
        num_rounds=1, prompts_per_round=2, samples_per_prompt=2, num_inference_steps=3, p_step=1, gradient_accumulation=1,
        p_batch_size=4, learning_rate=1e-3, eta=0.8, kl_weight=0.1, progress=False, eval_images_per_prompt=1, seed=0,
        buffer_size=32, guidance_scale=3.0)
    trainer = genft.Trainer(config, reward=Brightness(), prompts=PROMPTS[:2], eval_prompts=PROMPTS[:1])
    if "max_sequence_length" in LOAD_KW[name]:
        assert trainer.pipeline.max_sequence_length == LOAD_KW[name]["max_sequence_length"]
    if "resolution" in LOAD_KW[name]:
        default = pipelines.load(str(tmp_path / "model"), max_sequence_length=LOAD_KW[name]["max_sequence_length"])
        assert trainer.pipeline.sample_size == pipelines.load(str(tmp_path / "model"), **LOAD_KW[name]).sample_size
        assert trainer.pipeline.sample_size != default.sample_size
    before = {k: v.clone() for k, v in trainer.pipeline.unet.state_dict().items()}
    prompts = trainer.round_prompts(0)
    traj, rewards = trainer.sample_and_score(prompts, _gens(0, len(prompts)))
    trainer.method.collect(traj, trainer.method.advantages(rewards, prompts), rewards)
    batch = trainer.method.buffer.sample(4, torch.Generator().manual_seed(0))
    loss, metrics = trainer.method.loss(batch, round_index=0)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    trainer.update(0)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.pipeline.unet.state_dict().items())


# ----- the pieces, against closed forms and diffusers' own helpers -------------------------------------
def test_pack_and_unpack_are_inverse_and_refuse_wide_rows():
    hidden, pooled, ids = torch.randn(2, 5, 8), torch.randn(2, 6), torch.randn(2, 3)
    packed = pack(hidden, pooled, ids)
    assert packed.shape == (2, 7, 8) and (packed[:, 5, 6:] == 0).all()
    h, (p, i) = unpack(packed, 6, 3)
    assert torch.equal(h, hidden) and torch.equal(p, pooled) and torch.equal(i, ids)
    with pytest.raises(ValueError, match="d <= 8"):
        pack(hidden, torch.randn(2, 9))


def test_flux_packing_and_ids_match_diffusers():
    x = torch.randn(2, 4, 6, 8)
    ref = diffusers.FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    assert torch.equal(pack_latents(x), ref) and torch.equal(unpack_latents(ref, 6, 8), x)
    torch.testing.assert_close(image_ids(6, 8, "cpu", torch.float32),
                               diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_sdxl_conditioning_matches_diffusers_encode_prompt(tmp_path):
    save_family("sdxl", tmp_path)
    pipe = pipelines.load(str(tmp_path))
    hf = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path))
    emb, neg, pooled, neg_pooled = hf.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ours = pipe.encode_prompt(PROMPTS)
    hidden, (p, time_ids) = unpack(ours, 16, 6)
    torch.testing.assert_close(hidden, emb)
    torch.testing.assert_close(p, pooled)
    assert time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3  # 8×8 latents × the 2× VAE
    zero = pipe.encode_negative("", 3)
    assert (unpack(zero, 16, 6)[0] == 0).all() and (unpack(zero, 16, 6)[1][0] == 0).all() and (neg == 0).all()
    torch.testing.assert_close(unpack(zero, 16, 6)[1][1], time_ids)


def test_refusals(tmp_path):
    save_family("flux", tmp_path / "flux")
    with pytest.raises(ValueError, match="at most 12"):
        pipelines.load(str(tmp_path / "flux"), **LOAD_KW["flux"]).rollout(["a red cat on the moon " * 4], num_inference_steps=1)
    with pytest.raises(ValueError, match="must be even"):
        pipelines.load(str(tmp_path / "flux"), resolution=7)
    save_family("sd15", tmp_path / "sd")
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        pipelines.load(str(tmp_path / "sd"), resolution=15)
    assert pipelines.load(str(tmp_path / "sd"), resolution=32).latent_shape == (4, 16, 16)
    with pytest.raises(ValueError, match="max_sequence_length applies"):
        pipelines.load(str(tmp_path / "sd"), max_sequence_length=8)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="registered pipeline classes: .*FluxPipeline.*StableDiffusionXLPipeline"):
        pipelines.load(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match="neither a folder nor a hub id"):
        pipelines.load(str(tmp_path / "missing"))
