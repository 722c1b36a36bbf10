"""`genft eval` on a LoRA run: the diffusers-format adapters are put on the base model, then taken off again."""
import json

import numpy as np
import yaml
from PIL import Image

from _tiny import tiny_diffusion_pipeline
from genft.cli import main


def test_eval_compares_a_lora_checkpoint_with_its_base(tmp_path):
    model = tmp_path / "model"
    tiny_diffusion_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    cfg = dict(method="dpok", model=str(model), reward="jpeg_compressibility", eval_rewards=[], prompts=str(prompts),
               eval_prompts=str(prompts), output_dir=str(tmp_path / "run"), num_rounds=1, prompts_per_round=2,
               samples_per_prompt=2, num_inference_steps=2, p_step=2, gradient_accumulation=1, p_batch_size=4,
               progress=False, eval_images_per_prompt=1, device="cpu", learning_rate=5e-2, finetune="lora", lora_rank=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    final = tmp_path / "run" / "checkpoints" / "final"
    assert (final / "lora").is_dir()
    manifest = json.loads((final / "manifest.json").read_text())
    assert "lora/pytorch_lora_weights.safetensors" in manifest  # written inside the checkpoint's one atomic rename

    out = tmp_path / "ev"
    args = ["eval", "--model", str(model), "--checkpoints", str(final), str(final), "--prompts", str(prompts),
            "--rewards", "jpeg_compressibility", "--images-per-prompt", "1", "--steps", "2", "--features", "pixels",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    labels = list(summary["metrics"])
    assert len(labels) == 3 and labels[0] == "base"
    dirs = sorted(p for p in (out / "evals").iterdir() if p.is_dir())

    def pixels(d):
        return np.stack([np.asarray(Image.open(f)) for f in sorted((d / "images").glob("*.png"))])

    by_label = {d.name: pixels(d) for d in dirs}
    base = by_label.pop("base")
    first, second = by_label.values()
    assert not np.array_equal(base, first)  # the adapters changed the samples
    np.testing.assert_array_equal(first, second)  # and were removed before the next model loaded them again
