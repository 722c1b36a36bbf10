"""DPOK drives flow-matching models too (the Flow-GRPO SDE as its policy), loaded by family from a folder."""
import pytest
import torch

import genft
from pipelines import FlowMatchPipeline
from reward_models import RewardModel
from _tiny import tiny_flow_pipeline

PROMPTS = ["a red cat", "a blue dog"]


class Brightness(RewardModel):
    name = "brightness"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _config(tmp_path, model, **kw):
    base = dict(model=str(model), reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"),
                num_rounds=2, prompts_per_round=2, samples_per_prompt=4, num_inference_steps=4, p_step=2,
                gradient_accumulation=1, p_batch_size=8, learning_rate=1e-3, eta=0.7, kl_weight=0.1, progress=False,
                eval_images_per_prompt=2, seed=0, buffer_size=64, guidance_scale=2.0)
    base.update(kw)
    return genft.load_config(**base)


def test_dpok_on_a_saved_flow_model_loads_it_by_family_and_updates_it(tmp_path):
    folder = tmp_path / "flow_model"
    tiny_flow_pipeline().save_pretrained(folder)
    trainer = genft.Trainer(_config(tmp_path, folder), reward=Brightness(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])
    assert isinstance(trainer.pipeline, FlowMatchPipeline)
    before = {k: v.clone() for k, v in trainer.pipeline.unet.state_dict().items()}

    prompts = trainer.round_prompts(0)
    traj, rewards = trainer.sample_and_score(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    trainer.method.collect(traj, trainer.method.advantages(rewards, prompts), rewards)
    batch = trainer.method.buffer.sample(8, torch.Generator().manual_seed(0))
    loss, metrics = trainer.method.loss(batch, round_index=0)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-10)

    result = trainer.train()
    assert result["after"] is not None
    changed = [k for k, v in trainer.pipeline.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no velocity-model weight changed"
