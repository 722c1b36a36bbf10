"""FSDP (`fsdp: true`): 2 CPU processes with the generator sharded train like 1 process with the same global batch,
write checkpoints a plain diffusers loader reads, and resume bit-identically; what it cannot do yet is refused."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

import genft
from _tiny import tiny_diffusion_pipeline
from genft.config import ConfigError
from test_distributed import _config, _run, _weights, assert_matches_single_process


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """The DDP test's DPOK config (3 prompts × 2 samples, groups spanning processes) with `changes`."""
    cfg = yaml.safe_load(_config(tmp_path, name).read_text())
    cfg.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "genft.cli", "train", str(config)]


@pytest.mark.slow
def test_two_sharded_processes_match_one_process_and_resume_bit_identically(tmp_path):
    _run([sys.executable, "-m", "genft.cli", "train", str(_variant(tmp_path, "single"))],
         _torchrun(_variant(tmp_path, "fsdp", fsdp=True, checkpoint_every=1)), cwd=tmp_path)
    fsdp = tmp_path / "fsdp"
    state = json.loads((fsdp / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "by_name" and state["fsdp_units"] > 0
    total = sum(v.numel() * v.element_size() for v in tiny_diffusion_pipeline().unet.state_dict().values())
    assert state["local_parameter_bytes"] <= 0.6 * total  # each process holds about half of the weights
    # Same checks and bound as DDP's; the gradient norm here is a reduction over the shards (DTensor).
    assert_matches_single_process(fsdp, tmp_path / "single")
    w2 = _weights(fsdp)
    # The gathered checkpoint is an ordinary diffusers folder.
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(fsdp / "checkpoints" / "final" / "unet")
    assert all(torch.equal(loaded.state_dict()[k], w2[k]) for k in w2)

    # Resume the sharded run from round 2 (weights and name-keyed optimiser state back into the shards, RNG per process).
    _run(_torchrun(_variant(tmp_path, "resumed", fsdp=True, resume_from=str(fsdp / "checkpoints" / "round_00002"))), cwd=tmp_path)
    w3 = _weights(tmp_path / "resumed")
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "resumed FSDP run differs from the uninterrupted one"


@pytest.mark.parametrize("changes, match", [
    (dict(finetune="lora"), "fsdp=true does not support finetune=lora"),
    (dict(ema_decay=0.9), "fsdp=true does not support ema_decay"),
    (dict(mixed_precision="fp16"), "use bf16"),
])
def test_what_fsdp_cannot_do_yet_is_refused_by_the_config(changes, match):
    with pytest.raises(ConfigError, match=match):
        genft.load_config(fsdp=True, **changes)
    with pytest.raises(ConfigError, match="adaptive_reference=true with fsdp=true"):
        genft.load_config(method="gardo_grpo", fsdp=True, aux_rewards=["jpeg_compressibility"], diversity_features="pixels")


def test_fsdp_with_one_process_is_refused_before_a_model_loads(tmp_path):
    cfg = genft.load_config(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path), device="cpu", fsdp=True)
    with pytest.raises(ConfigError, match="fsdp=true shards the generator over processes but this run has one"):
        genft.Trainer(cfg, prompts=["a red cat"], eval_prompts=["a red cat"])
