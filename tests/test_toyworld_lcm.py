"""The toy world's LCM: consistency-distilled from the diffusion base, saved atomically, validated, reused, accurate in 1–4 steps."""
import json

import pytest
import torch

import genft.toyworld.lcm_distill as ld
from genft.models import check_method_fits_model
from genft.toyworld.pretrain import evaluate_heldout
from pipelines import ConsistencyPipeline, detect_family


def test_lcm_is_distilled_saved_and_reused(world, monkeypatch):
    cfg = ld.LCMDistillConfig(steps=2, batch_size=4, eval_images_per_prompt=0)
    path = ld.load_or_distill_lcm(world_dir=world, config=cfg, progress=False)
    assert path == world.with_name("toyworld-v2-lcm")
    meta = ld.validate_lcm_world(path)
    assert meta["stats"]["distill_steps"] == 2 and meta["world"] == str(world)
    assert detect_family(str(path)) == "consistency"
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    for f in ("tokenizer/vocab.json", "text_encoder/model.safetensors"):  # the world's own text side, unchanged
        assert (path / f).read_bytes() == (world / f).read_bytes()
    pipe = ConsistencyPipeline.from_pretrained(path)
    assert pipe.embeds_guidance and pipe.timesteps(4).tolist() == [959, 719, 479, 239]
    images = pipe.sample(["a red 7 on a blue background"], generator=torch.Generator().manual_seed(0), num_inference_steps=1)
    assert images.shape == (1, 3, 16, 16)

    monkeypatch.setattr(ld, "distill_lcm", lambda *a, **k: pytest.fail("a valid toy LCM was distilled again"))
    assert ld.load_or_distill_lcm(world_dir=world, progress=False) == path


def test_student_starts_as_the_teacher_and_the_losses_are_as_stated():
    from genft.toyworld.models import build_unet

    torch.manual_seed(0)
    teacher = build_unet(16, (16, 32))
    student = ld.student_from_teacher(teacher, 8)
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4, 16)
    with torch.no_grad():
        same = student(x, t, encoder_hidden_states=cond, timestep_cond=torch.randn(2, 8)).sample
        torch.testing.assert_close(same, teacher(x, t, encoder_hidden_states=cond).sample)
    sched_t, k = ld.skipping_schedule(48)
    assert k == 20 and sched_t[0] == 19 and sched_t[-1] == 959
    a, b = torch.zeros(1, 4), torch.full((1, 4), 0.3)
    torch.testing.assert_close(ld.distillation_loss(a, b, "l2"), torch.tensor([0.09]))
    torch.testing.assert_close(ld.distillation_loss(a, b, "huber", 1e-3), torch.tensor([(0.09 + 1e-6) ** 0.5 - 1e-3]))


def test_a_broken_lcm_is_reported_and_the_recipe_is_checked(tmp_path):
    bad = tmp_path / "toyworld-v2-lcm"
    bad.mkdir()
    with pytest.raises(ValueError, match="incomplete: missing genft_toyworld_lcm.json"):
        ld.validate_lcm_world(bad)
    (bad / ld.LCM_META_FILE).write_text(json.dumps({"lcm_format_version": 0}))
    for f in ld.LCM_REQUIRED_FILES:
        (bad / f).parent.mkdir(parents=True, exist_ok=True)
        (bad / f).write_text("{}")
    with pytest.raises(ValueError, match="lcm_format_version 0"):
        ld.validate_lcm_world(bad)
    with pytest.raises(ValueError, match="guidance_min"):
        ld.LCMDistillConfig(guidance_min=0.5)
    with pytest.raises(ValueError, match="eval_steps"):
        ld.LCMDistillConfig(eval_steps=(1, 60))
    with pytest.raises(ValueError, match="target_ema_decay"):
        ld.LCMDistillConfig(target_ema_decay=1.0)


def test_toyworld_lcm_is_a_consistency_model_name():
    from genft.config import ConfigError
    from genft.methods import ROCM

    class DiffusionOnly:
        name, families = "diffusion_only", ("diffusion",)

    check_method_fits_model(ROCM, "toyworld-lcm")
    with pytest.raises(ConfigError, match="model='toyworld-lcm' is a consistency model"):
        check_method_fits_model(DiffusionOnly, "toyworld-lcm")


@pytest.mark.slow
def test_distilled_toy_lcm_keeps_oracle_accuracy_in_one_to_four_steps(pretrained_toy_world):
    """Distils the session's toy world with the default recipe and checks held-out accuracy at 1, 2 and 4 steps."""
    path = ld.load_or_distill_lcm(world_dir=pretrained_toy_world["path"], progress=False)
    meta = ld.validate_lcm_world(path)
    stored = {r["num_inference_steps"]: r["all_acc"] for r in meta["stats"]["heldout"]}
    pipe = ConsistencyPipeline.from_pretrained(path)
    for steps in (1, 2, 4):
        fresh = evaluate_heldout(pipe, 4, steps, 3.0, eta=1.0, seed=0)  # the saved weights, sampled again
        assert fresh["all_acc"] == pytest.approx(stored[steps], abs=0.02)
        assert fresh["all_acc"] >= 0.7, f"{steps}-step held-out oracle accuracy {fresh['all_acc']:.3f} < 0.7 ({meta['stats']})"
