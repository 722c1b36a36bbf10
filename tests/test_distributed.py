"""Two CPU processes (gloo) train like one process with the same global batch.

The two-process run is launched with `torch.distributed.run` (what `accelerate launch --multi_gpu` runs
underneath; accelerate's own CPU launcher needs MPI), each process building its `Accelerator` from the
environment. Both runs are subprocesses, so no accelerate state leaks into other tests.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genft.config import ConfigError
from genft.distributed import check_data_parallel, check_divisible, shard_minibatch, shard_span
from reward_models import RewardModel
from _tiny import tiny_diffusion_pipeline

TESTS = Path(__file__).parent


class Redness(RewardModel):
    """A smooth reward (mean red minus mean blue): no quantisation step (as JPEG has) to amplify round-off."""

    name = "redness"

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def test_shard_span_and_minibatch_slices_cover_the_batch_in_order():
    assert [shard_span(6, r, 2) for r in range(2)] == [(0, 3), (3, 6)]
    batch = {"x": torch.arange(8), "y": torch.arange(16).view(8, 2), "names": list("abcdefgh"), "flag": True, "none": None}
    parts = [shard_minibatch(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"])
    assert sum((p["names"] for p in parts), []) == batch["names"]
    assert all(p["flag"] is True and p["none"] is None for p in parts)
    with pytest.raises(ValueError, match="multiple of 3"):
        shard_minibatch(batch, 0, 3)
    with pytest.raises(ValueError, match="disagree"):
        shard_minibatch({"x": torch.arange(4), "y": torch.arange(6)}, 0, 2)
    with pytest.raises(ConfigError, match="prompts_per_round.*multiple of 4"):
        check_divisible("prompts_per_round*samples_per_prompt", 6, 4)


def test_sharded_accelerate_modes_are_refused_and_ddp_is_accepted():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    with pytest.raises(ConfigError, match="MEGATRON_LM is not supported.*ddp.yaml.*deepspeed_zero2.yaml.*fsdp: true"):
        check_data_parallel(SimpleNamespace(distributed_type=DistributedType.MEGATRON_LM))
    with pytest.raises(ConfigError, match="FSDP is not how genft shards.*fsdp.yaml.*fsdp: true"):
        check_data_parallel(SimpleNamespace(distributed_type=DistributedType.FSDP))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.DEEPSPEED):
        check_data_parallel(SimpleNamespace(distributed_type=kind))


@pytest.mark.parametrize("field, overrides", [("prompts_per_round", dict(prompts_per_round=3, samples_per_prompt=1)),
                                               ("p_batch_size", dict(p_batch_size=3))])
def test_sizes_that_do_not_split_over_processes_are_refused_before_a_model_loads(tmp_path, field, overrides):
    import genft
    from types import SimpleNamespace

    two = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True, distributed_type="MULTI_CPU")
    cfg = genft.load_config(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path), device="cpu", **overrides)
    with pytest.raises(ConfigError, match=f"{field}.*2 processes"):
        genft.Trainer(cfg, prompts=["a red cat"], eval_prompts=["a red cat"], accelerator=two)


def _config(tmp_path: Path, name: str) -> Path:
    model = tmp_path / "model"
    if not model.exists():
        tiny_diffusion_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green 7\n")
    # 3 prompts × 2 samples = 6 per round, 3 per process: the middle prompt's group spans both processes, and
    # advantage="group" normalises over the whole group, so gathering the rewards first matters.
    cfg = dict(method="dpok", model=str(model), reward="test_distributed:Redness", eval_rewards=[], prompts=str(prompts),
               eval_prompts=str(prompts), eval_max_prompts=1, eval_images_per_prompt=1, output_dir=str(tmp_path / name),
               num_rounds=3, prompts_per_round=3, samples_per_prompt=2, num_inference_steps=3, advantage="group",
               p_step=2, gradient_accumulation=2, p_batch_size=4, learning_rate=1e-4, kl_weight=0.01,
               progress=False, device="cpu", seed=3)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*cmds, cwd: Path):
    """Run the commands side by side (each single-threaded) and check they all succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]


def _weights(run: Path):
    return load_file(str(next((run / "checkpoints" / "final" / "unet").glob("*.safetensors"))))


def _rounds(run: Path, key: str):
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "reward_mean" in r]


def assert_matches_single_process(multi: Path, single: Path) -> None:
    """A multi-process run (DDP, FSDP or DeepSpeed) followed the single-process run with the same config."""
    assert json.loads((multi / "checkpoints" / "final" / "trainer_state.json").read_text())["num_processes"] == 2
    # One log line per round (main process only) and the same global rollouts in both runs.
    assert len(_rounds(multi, "reward_mean")) == 3
    torch.testing.assert_close(torch.tensor(_rounds(multi, "reward_mean")), torch.tensor(_rounds(single, "reward_mean")),
                               rtol=0, atol=1e-5)
    # The gradient itself (norm before clipping, after the processes' reduction) and the loss equal the single-process
    # ones: this catches a summed instead of averaged gradient, which Adam's scale invariance would hide in the weights.
    for key in ("grad_norm", "loss", "kl"):
        torch.testing.assert_close(torch.tensor(_rounds(multi, key)), torch.tensor(_rounds(single, key)), rtol=1e-4, atol=1e-6)

    init = tiny_diffusion_pipeline().unet.state_dict()
    w1, w2 = _weights(single), _weights(multi)
    assert set(w1) == set(w2)
    moved = max((w1[k] - init[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-4, "training did not change the weights"
    # Tolerance: the runs do the same arithmetic in another order (convolutions over 3 samples instead of 6, the
    # gradient as (mean of 2 + mean of 2)/2 instead of a mean of 4), so they agree to float32 round-off, not bit for
    # bit; Adam divides by sqrt(v), which blows up the relative round-off of near-zero gradients. Measured: weights
    # moved 5.7e-4, the runs differ by 4.6e-7 (8e-4 of it). 1e-2 of the distance travelled leaves 12x headroom and
    # is far below a real error: with both processes training on the same half of each minibatch the runs differ by 9.8e-4.
    assert diff <= 1e-2 * moved, f"max |w_multi - w_single| = {diff:.3g}, weights moved {moved:.3g}"


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    _run([sys.executable, "-m", "genft.cli", "train", str(_config(tmp_path, "single"))],
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "genft.cli", "train", str(_config(tmp_path, "ddp"))], cwd=tmp_path)
    assert_matches_single_process(tmp_path / "ddp", tmp_path / "single")
