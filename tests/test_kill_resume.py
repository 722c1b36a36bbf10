"""SIGKILL mid-run, resume_from=latest, and end with weights, optimiser and EMA bit-identical to an uninterrupted run.

Also: a checkpoint carries every RNG the loop may draw from and any stateful helper (EMA, LR scheduler).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genft.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from _tiny import tiny_unet
from test_interrupt_resume import _config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


class _Counter:
    """Stands in for an EMA or LR scheduler: anything with state_dict/load_state_dict."""

    def __init__(self):
        self.steps = torch.zeros(2)

    def state_dict(self):
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state):
        self.steps = state["steps"].clone()


def test_checkpoint_restores_rng_streams_and_stateful_helpers(tmp_path):
    unet = tiny_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    helper = _Counter()
    helper.steps += 7
    rng = capture_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "ck", unet, opt, {"tracker": {"a red cat": [0.5, 0.25]}}, {"round": 3},
                    stateful={"ema": helper}, rng_states=[rng])
    _draws()  # move every stream on

    fresh = _Counter()
    loaded = load_checkpoint(tmp_path / "ck", tiny_unet(), None, stateful={"ema": fresh})
    restore_rng_state(loaded["rng_states"][0])
    again = _draws()
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    assert torch.equal(fresh.steps, torch.full((2,), 7.0))
    assert loaded["method_state"]["tracker"] == {"a red cat": [0.5, 0.25]}
    with pytest.raises(ValueError, match="no saved state for \\['lr_scheduler'\\]"):
        load_checkpoint(tmp_path / "ck", tiny_unet(), None, stateful={"lr_scheduler": _Counter()})


def _train(cfg: Path, *overrides: str, **kw):
    return subprocess.Popen([sys.executable, "-m", "genft.cli", "train", str(cfg), *overrides], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _final(run: Path):
    return load_file(str(next((run / "checkpoints" / "final" / "unet").glob("*.safetensors"))))


def test_sigkill_then_resume_latest_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path, num_rounds=8, checkpoint_every=1, seed=5, ema_decay=0.9)  # the EMA must resume too
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    victim = _train(cfg, f"output_dir={killed}")
    marker = killed / "checkpoints" / "round_00002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was being written is left as it is
    _, err = victim.communicate(timeout=60)
    assert marker.exists(), err[-2000:]
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "checkpoints" / "final").exists()
    done_rounds = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "round_00008" not in done_rounds

    resumed = _train(cfg, f"output_dir={killed}", "resume_from=latest")
    reference = _train(cfg, f"output_dir={straight}")
    for proc in (resumed, reference):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]

    a, b = _final(straight), _final(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    state = json.loads((killed / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["round"] == 8 and state["optimizer_steps"] == 8
    opt_a = torch.load(straight / "checkpoints" / "final" / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(killed / "checkpoints" / "final" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    ema_a, ema_b = (torch.load(run / "checkpoints" / "final" / "states.pt", weights_only=True)["ema"]
                    for run in (straight, killed))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 8
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
