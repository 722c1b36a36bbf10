"""Checkpoints: corruption is detected before loading and resume falls back; pickles that run code are refused."""
import os
import pickle

import pytest
import torch

import genft
from genft.checkpoint import CorruptCheckpointError, latest_checkpoint, load_checkpoint, verify_checkpoint
from _tiny import tiny_diffusion_pipeline

PROMPTS = ["a red cat", "a blue dog"]


def _trainer(tmp_path, **kw):
    cfg = genft.load_config(reward="jpeg_compressibility", eval_rewards=[], output_dir=str(tmp_path / "run"), num_rounds=2,
                            prompts_per_round=2, samples_per_prompt=2, num_inference_steps=2, p_step=1, gradient_accumulation=1,
                            p_batch_size=4, progress=False, eval_images_per_prompt=1, seed=0, checkpoint_every=1, **kw)
    return genft.Trainer(cfg, pipeline=tiny_diffusion_pipeline(), prompts=PROMPTS, eval_prompts=PROMPTS[:1])


def test_corrupt_newest_checkpoint_is_skipped_and_the_previous_one_resumes(tmp_path):
    _trainer(tmp_path).train()
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "final"
    weights = next((newest / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different hash
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        verify_checkpoint(newest)
    messages = []
    found = latest_checkpoint(ckpts, log=messages.append)
    assert found is not None and found.name == "round_00002"
    assert any("falling back" in m for m in messages)

    resumed = _trainer(tmp_path, resume_from="latest")
    assert resumed.round == 2


def test_corrupt_checkpoint_leaves_the_model_untouched(tmp_path):
    _trainer(tmp_path).train()
    ckpt = tmp_path / "run" / "checkpoints" / "round_00001"
    (ckpt / "optimizer.pt").write_bytes(b"truncated")
    pipe = tiny_diffusion_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        load_checkpoint(ckpt, pipe.unet, None)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        _trainer(tmp_path / "other", resume_from=str(ckpt))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    _trainer(tmp_path).train()
    ckpt = tmp_path / "run" / "checkpoints" / "final"
    evil = ckpt / "method_state.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state": _RunsCode()}, f)
    # Re-seal the manifest so only the pickle check stands between the file and torch.load.
    from genft.checkpoint import _write_manifest

    _write_manifest(ckpt)
    called = []
    monkeypatch.setattr(os, "system", lambda cmd: called.append(cmd) or 0)
    unet = tiny_diffusion_pipeline().unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(ckpt, unet, None)
    assert called == []
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
