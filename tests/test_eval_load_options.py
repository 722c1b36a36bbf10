"""`genft eval` loads the base model at the resolution and T5 length a checkpoint was trained at (same model only)."""
import torch

from _tiny import tiny_diffusion_pipeline, tiny_unet
from genft.checkpoint import save_checkpoint
from genft.eval_cli import plan_eval


def test_eval_samples_a_checkpoint_at_the_resolution_and_t5_length_it_trained_at(tmp_path):
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    tiny_diffusion_pipeline().save_pretrained(tmp_path / "model")  # stands for the hub id or folder the run trained
    cfg = {"model": str(tmp_path / "model"), "resolution": 512, "max_sequence_length": 128}
    ckpt = save_checkpoint(tmp_path / "ckpt", unet, opt, {}, {"round": 1, "config": cfg})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 7 on a blue background\n")
    plan = plan_eval(str(tmp_path / "eval"), [str(ckpt)], rewards=["jpeg_compressibility"], prompts=str(prompts),
                     features="pixels")
    assert plan.model == cfg["model"] and plan.load_options == {"resolution": 512, "max_sequence_length": 128}
    other = plan_eval(str(tmp_path / "eval2"), [str(ckpt)], model="toyworld", rewards=["jpeg_compressibility"],
                      prompts=str(prompts), features="pixels")
    assert other.load_options == {}  # another base model: its own defaults
