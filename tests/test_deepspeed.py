"""DeepSpeed ZeRO-2 through `accelerate launch` with the shipped config: 2 CPU processes (gloo) train like 1 process
with the same global batch, and a run resumed from a checkpoint (weights + each process's optimiser partition)
is bit-identical to the uninterrupted one."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from _tiny import tiny_diffusion_pipeline
from test_distributed import TESTS, _weights, assert_matches_single_process
from test_fsdp import _variant

pytest.importorskip("deepspeed")

CONFIG = Path(__file__).resolve().parent.parent / "scripts" / "recipes" / "accelerate" / "deepspeed_zero2.yaml"


def _launch(config: Path, cwd: Path) -> None:
    """`accelerate launch --config_file deepspeed_zero2.yaml -m genft.cli train config` on 2 CPU processes."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "-m", "genft.cli", "train", str(config)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_zero2_matches_one_process_and_resumes_bit_identically(tmp_path):
    import subprocess

    single = _variant(tmp_path, "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "genft.cli", "train", str(single)], env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    _launch(_variant(tmp_path, "zero", checkpoint_every=1), tmp_path)
    run = tmp_path / "zero"
    state = json.loads((run / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["optimizer_format"] == "deepspeed_zero"
    assert sorted(p.name for p in (run / "checkpoints" / "final" / "zero").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert not list(run.glob("checkpoints/.*staging"))  # the partitions moved into the checkpoint
    part = torch.load(run / "checkpoints" / "final" / "zero" / "rank_0.pt", weights_only=False)
    held = sum(t.numel() for t in part["single_partition_of_fp32_groups"])
    total = sum(p.numel() for p in tiny_diffusion_pipeline().unet.parameters())
    assert 0.4 * total <= held <= 0.6 * total  # each process keeps about half of the AdamW state (ZeRO partitions)
    assert_matches_single_process(run, tmp_path / "single")
    w2 = _weights(run)

    _launch(_variant(tmp_path, "resumed", resume_from=str(run / "checkpoints" / "round_00002")), tmp_path)
    w3 = _weights(tmp_path / "resumed")
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "resumed DeepSpeed run differs from the uninterrupted one"


def _accelerator(ds_config):
    from types import SimpleNamespace

    return SimpleNamespace(num_processes=2, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))


@pytest.mark.parametrize("ds_config, match", [
    ({"zero_optimization": {"stage": 3}}, "zero_stage=3 is not supported.*fsdp: true"),
    ({"zero_optimization": {"stage": 0}}, "zero_stage=0 is not supported"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer.device='cpu'"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "DeepSpeed bf16 is enabled.*genft's own mixed_precision"),
])
def test_deepspeed_settings_genft_does_not_drive_are_refused(ds_config, match):
    from genft import zero
    from genft.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        zero.check_config(_accelerator(ds_config))


def test_genft_settings_are_written_into_the_deepspeed_config():
    from genft import zero

    acc = _accelerator({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto"})
    zero.check_config(acc)
    zero.configure(acc, accumulation=3, max_grad_norm=1.5)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 6 and ds["gradient_clipping"] == 1.5
