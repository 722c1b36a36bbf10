"""SIGTERM checkpoints and exits cleanly; resume_from=latest skips incomplete checkpoints and carries on."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from genft.checkpoint import latest_checkpoint
from _tiny import tiny_diffusion_pipeline


def _config(tmp_path: Path, **kw) -> Path:
    model = tmp_path / "model"
    if not model.exists():
        tiny_diffusion_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    cfg = dict(method="dpok", model=str(model), reward="jpeg_compressibility", eval_rewards=[], prompts=str(prompts),
               eval_prompts=str(prompts), output_dir=str(tmp_path / "run"), num_rounds=200, prompts_per_round=2,
               samples_per_prompt=2, num_inference_steps=3, p_step=1, gradient_accumulation=1, p_batch_size=4,
               progress=False, eval_images_per_prompt=1, device="cpu")
    cfg.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rounds(log: Path):
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def test_sigterm_saves_a_checkpoint_and_resume_latest_continues(tmp_path):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genft.cli", "train", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not any("reward_mean" in r for r in _rounds(log)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out
    events = [r for r in _rounds(log) if r.get("event") == "interrupted"]
    assert len(events) == 1
    ckpt = Path(events[0]["checkpoint"])
    assert (ckpt / "COMPLETE").is_file()
    stopped_at = events[0]["round"]

    # a half-written later checkpoint must be skipped
    bad = tmp_path / "run" / "checkpoints" / "round_99999"
    (bad / "unet").mkdir(parents=True)
    messages = []
    assert latest_checkpoint(tmp_path / "run" / "checkpoints", log=messages.append) == ckpt
    assert any("incomplete" in m for m in messages)

    cfg2 = _config(tmp_path, num_rounds=stopped_at + 1, resume_from="latest")
    done = subprocess.run([sys.executable, "-m", "genft.cli", "train", str(cfg2)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = [r["round"] for r in _rounds(log) if "reward_mean" in r]
    assert trained[-1] == stopped_at + 1 and trained.count(stopped_at + 1) == 1
