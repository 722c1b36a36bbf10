"""Diff-Instruct* on tiny one-step generators: updates, the fake-score net, checkpoints, `genft train`, refusals."""
import json

import pytest
import torch
import yaml

import genft
from genft.cli import main
from genft.config import ConfigError
from genft.methods.diff_instruct_star import DiffInstructStar, DiffInstructStarConfig
from genft.models import load_pipeline
from pipelines import OneStepPipeline
from reward_models import RewardModel
from _tiny import tiny_diffusion_pipeline

PROMPTS = ["a red cat", "a blue dog", "the moon", "a green cat"]
T_STAR = 80


class Brightness(RewardModel):
    """Mean pixel value, differentiable."""

    name = "brightness"
    supports_grad = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_base")
    tiny_diffusion_pipeline().save_pretrained(d)
    return d


@pytest.fixture()
def gen(base_dir):
    from pipelines import DiffusionPipeline

    return OneStepPipeline.from_diffusion(DiffusionPipeline.from_pretrained(base_dir), T_STAR, base_model=str(base_dir))


def small_config(tmp_path, **kw):
    base = dict(method="diff_instruct_star", model="unused", reward="brightness", eval_rewards=[], output_dir=str(tmp_path / "run"),
                num_rounds=2, prompts_per_round=2, samples_per_prompt=2, learning_rate=1e-3, reward_weight=1.0,
                reference_guidance_scale=3.0, fake_learning_rate=1e-3, fake_updates_per_step=2, progress=False,
                eval_images_per_prompt=1, eval_max_prompts=2, seed=0, max_grad_norm=0.0)
    base.update(kw)
    return genft.load_config(**base)


def _method(tmp_path, gen, **kw):
    method = DiffInstructStar(small_config(tmp_path, **kw), gen)
    method.attach(reward=Brightness(differentiable=True))
    return method


def _collect(method, gen, seeds=(0, 1, 2, 3)):
    traj = gen.rollout(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds])
    method.collect(traj, None, None)
    return traj


def test_one_update_changes_the_generator_and_only_the_generator(tmp_path, gen):
    method = _method(tmp_path, gen)
    _collect(method, gen)
    teacher0 = {k: v.clone() for k, v in method.teacher_unet.state_dict().items()}
    fake0 = {k: v.clone() for k, v in method.fake_unet.state_dict().items()}
    before = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    opt = torch.optim.Adam(gen.unet.parameters(), lr=1e-3)
    batch = next(iter(method.minibatches(torch.Generator().manual_seed(0))))
    loss, metrics = method.loss(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in method.fake_unet.parameters()) and all(p.grad is None for p in method.teacher_unet.parameters())
    opt.step()
    assert any(not torch.equal(v, before[k]) for k, v in gen.unet.state_dict().items())
    assert all(torch.equal(v, teacher0[k]) for k, v in method.teacher_unet.state_dict().items())
    assert all(torch.equal(v, fake0[k]) for k, v in method.fake_unet.state_dict().items())
    assert set(metrics) >= {"reward_at_gradient", "surrogate", "score_divergence"} and torch.isfinite(loss)


def test_divergence_alone_pulls_toward_the_reference_and_vanishes_when_scores_agree(tmp_path, gen):
    method = _method(tmp_path, gen, reference_guidance_scale=1.0)  # fake = reference at init, no guidance: y = 0
    x0 = gen.generate(torch.randn(4, 3, 8, 8), gen.encode_prompt(PROMPTS))
    terms = method.divergence_terms(x0, gen.encode_prompt(PROMPTS))
    assert terms["surrogate"].abs().max() == 0 and terms["divergence"].abs().max() == 0
    guided = _method(tmp_path, gen).divergence_terms(x0, gen.encode_prompt(PROMPTS))
    assert (guided["divergence"] > 0).all()


def test_fake_score_net_learns_the_generator_samples(tmp_path, gen):
    """Its DSM loss on a fixed batch of generator samples (fixed t and ε) falls after the extra steps."""
    method = _method(tmp_path, gen, fake_updates_per_step=6, fake_learning_rate=3e-3)
    emb = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        x0 = gen.generate(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9)), emb)
    state = method.generator.get_state()

    def fixed_loss():
        method.generator.set_state(state)
        with torch.no_grad():
            return method.fake_score_loss(x0, emb).item()

    before = fixed_loss()
    for r in range(2):
        _collect(method, gen)
        method._steps_this_round = 1
        out = method.extra_step(r)
        assert out["fake_updates"] == 6.0 and method.records is None
    assert fixed_loss() < 0.9 * before
    assert not any(p.requires_grad for p in method.fake_unet.parameters())  # frozen again for the generator's loss


def test_state_dict_round_trip_resumes_the_same_alternation(tmp_path, gen):
    m1 = _method(tmp_path, gen)
    _collect(m1, gen)
    m1._steps_this_round = 1
    m1.extra_step(0)
    path = tmp_path / "method_state.pt"
    torch.save(m1.state_dict(), path)
    m2 = _method(tmp_path, gen)
    m2.load_state_dict(torch.load(path, weights_only=True))  # what genft.checkpoint does
    assert all(torch.equal(v, m2.fake_unet.state_dict()[k]) for k, v in m1.fake_unet.state_dict().items())
    for m in (m1, m2):
        _collect(m, gen)
        m._steps_this_round = 1
    a, b = m1.extra_step(1), m2.extra_step(1)
    assert a["fake_dsm_loss"] == b["fake_dsm_loss"]
    assert all(torch.equal(v, m2.fake_unet.state_dict()[k]) for k, v in m1.fake_unet.state_dict().items())


def test_genft_train_end_to_end_from_a_saved_one_step_folder(tmp_path, gen, capsys):
    folder = tmp_path / "one_step"
    gen.save_pretrained(folder)
    assert isinstance(load_pipeline(str(folder), torch.device("cpu")), OneStepPipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = dict(method="diff_instruct_star", model=str(folder), reward="test_diff_instruct_star:Brightness", eval_rewards=[],
               prompts=str(prompts), eval_prompts=str(prompts), output_dir=str(tmp_path / "run"), num_rounds=2,
               prompts_per_round=2, samples_per_prompt=2, reward_weight=1.0, reference_guidance_scale=2.0, fake_updates_per_step=1,
               learning_rate=1e-4, progress=False, eval_images_per_prompt=1, device="cpu", checkpoint_every=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    updates = [r for r in rounds if "fake_dsm_loss" in r]
    assert len(updates) == 2 and all(r["optimizer_steps"] == 1 and r["fake_updates"] == 1.0 for r in updates)
    state = torch.load(tmp_path / "run" / "checkpoints" / "final" / "method_state.pt", weights_only=True)
    assert set(state) == {"fake_unet", "fake_optimizer", "generator"}
    # resume from round 1 reaches the same final generator as the uninterrupted run
    assert main(["train", str(path), f"output_dir={tmp_path / 'resumed'}",
                 f"resume_from={tmp_path / 'run' / 'checkpoints' / 'round_00001'}"]) == 0
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, resumed[k]) for k, v in final.items())


def test_refuses_diffusion_models_and_bad_settings(tmp_path, base_dir, monkeypatch):
    import genft.trainer as trainer_mod

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(trainer_mod, "load_pipeline", refuse)
    with pytest.raises(ConfigError, match="one_step generators, but model=.* is a diffusion model"):
        genft.Trainer(small_config(tmp_path, model=str(base_dir)), reward=Brightness(differentiable=True), prompts=PROMPTS,
                      eval_prompts=PROMPTS)
    with pytest.raises(ConfigError, match="diffusion model"):
        genft.Trainer(small_config(tmp_path, model="toyworld"), reward=Brightness(differentiable=True), prompts=PROMPTS,
                      eval_prompts=PROMPTS)
    with pytest.raises(ConfigError, match="trains one-step generators"):
        DiffInstructStar(small_config(tmp_path), tiny_diffusion_pipeline())
    for bad, match in [(dict(guidance_scale=3.0), "reference_guidance_scale"), (dict(num_inference_steps=4), "num_inference_steps=4"),
                       (dict(eta=1.0), "deterministic"), (dict(t_min=0.5, t_max=0.1), "t_min=0.5"),
                       (dict(pseudo_huber_c=0.0), "pseudo_huber_c"), (dict(gradient_accumulation=3), "multiple of")]:
        with pytest.raises(ConfigError, match=match):
            small_config(tmp_path, **bad)
    with pytest.raises(ConfigError, match="reward_weigth"):
        genft.load_config(method="diff_instruct_star", reward_weigth=1.0)
    assert isinstance(small_config(tmp_path), DiffInstructStarConfig)


def test_teacher_comes_from_the_recorded_base_or_reference_model(tmp_path, base_dir, gen):
    orphan = OneStepPipeline.from_diffusion(tiny_diffusion_pipeline(), T_STAR)  # records no base
    with pytest.raises(ConfigError, match="records no base"):
        DiffInstructStar(small_config(tmp_path), orphan)
    method = DiffInstructStar(small_config(tmp_path, reference_model=str(base_dir)), orphan)
    assert all(torch.equal(v, gen.unet.state_dict()[k]) for k, v in method.teacher_unet.state_dict().items())
    assert method.teacher_unet is not orphan.unet and not any(p.requires_grad for p in method.teacher_unet.parameters())


def test_recipe_loads_and_round_trips_through_yaml(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "scripts" / "recipes" / "diff_instruct_star_toyworld.yaml"
    cfg = genft.load_config(recipe)
    assert isinstance(cfg, DiffInstructStarConfig) and cfg.model == "toyworld-one-step" and cfg.num_inference_steps == 1
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = genft.load_config(path, overrides=["reward_weight=5"])
    assert again.reward_weight == 5.0 and again.replace(reward_weight=cfg.reward_weight).to_dict() == cfg.to_dict()
    assert "reference_guidance_scale" in DiffInstructStarConfig.field_help()


def test_teacher_with_another_text_encoder_or_latent_shape_is_refused(tmp_path, gen):
    other = tiny_diffusion_pipeline()
    with torch.no_grad():
        for p in other.text_encoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other.save_pretrained(tmp_path / "other_text")
    with pytest.raises(ConfigError, match="encodes prompts differently"):
        DiffInstructStar(small_config(tmp_path, reference_model=str(tmp_path / "other_text")), gen)
    from _tiny import tiny_unet

    other = tiny_diffusion_pipeline()
    other.unet = tiny_unet(sample_size=16)
    other.save_pretrained(tmp_path / "other_size")
    with pytest.raises(ConfigError, match="has latents"):
        DiffInstructStar(small_config(tmp_path, reference_model=str(tmp_path / "other_size")), gen)
