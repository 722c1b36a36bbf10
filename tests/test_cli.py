"""`genft train` from a YAML on a tiny model saved to disk (the same from_pretrained path a hub id takes)."""
import json

import pytest
import yaml

from genft.cli import main
from _tiny import tiny_diffusion_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_diffusion_pipeline().save_pretrained(d)
    return d


def test_train_from_yaml_with_overrides(tmp_path, model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n# comment\nthe moon\n")
    cfg = dict(method="dpok", model=str(model_dir), reward="jpeg_compressibility", eval_rewards=["jpeg_incompressibility"],
               prompts=str(prompts), eval_prompts=str(prompts), output_dir=str(tmp_path / "run"), num_rounds=2,
               prompts_per_round=2, samples_per_prompt=2, num_inference_steps=3, p_step=1, gradient_accumulation=1,
               p_batch_size=4, progress=False, eval_images_per_prompt=1, device="cpu")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "num_rounds=3", "learning_rate=1e-4"]) == 0
    out = capsys.readouterr().out
    assert "jpeg_compressibility" in out and "jpeg_incompressibility" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["num_rounds"] == 3 and saved["learning_rate"] == 1e-4
    assert (tmp_path / "run" / "checkpoints" / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_cli_refuses_bad_config_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: dpok\nlearnin_rate: 1.0\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "learnin_rate" in err and "learning_rate" in err


def test_help_config_lists_fields(capsys):
    assert main(["train", "dpok", "--help-config"]) == 0
    assert "kl_weight" in capsys.readouterr().out
