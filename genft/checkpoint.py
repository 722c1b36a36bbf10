"""Checkpoints: weights (safetensors via save_pretrained), optimiser, method state, loop counters; written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ._atomic import atomic_dir

_COMPLETE = "COMPLETE"


def save_checkpoint(path: Path, unet, optimizer: torch.optim.Optimizer, method_state: Dict[str, Any],
                    trainer_state: Dict[str, Any]) -> Path:
    """Write a checkpoint folder in one rename; a COMPLETE marker is the last file written."""
    with atomic_dir(path) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(method_state, tmp / "method_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / _COMPLETE).write_text("ok\n")
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / _COMPLETE).is_file() and (Path(path) / "trainer_state.json").is_file()


def load_checkpoint(path: Path, unet, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """Load weights and optimiser in place; returns {"trainer_state", "method_state"}. Refuses incomplete folders."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"resume_from={str(path)!r} is not a complete genft checkpoint (no {_COMPLETE} marker)")
    from safetensors.torch import load_file

    weights = next((path / "unet").glob("*.safetensors"))
    missing, unexpected = unet.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    method_state = torch.load(path / "method_state.pt", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return {"trainer_state": trainer_state, "method_state": method_state}


def latest_checkpoint(checkpoints_dir: Path, log=print) -> Optional[Path]:
    """The newest complete checkpoint under `checkpoints_dir`; incomplete or corrupt ones are skipped with a message."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    candidates = []
    for p in root.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not is_complete(p):
            log(f"genft: skipping incomplete checkpoint {p}")
            continue
        try:
            state = json.loads((p / "trainer_state.json").read_text())
            candidates.append((int(state["round"]), p.stat().st_mtime, p))
        except (ValueError, KeyError, OSError) as e:
            log(f"genft: skipping corrupt checkpoint {p} ({e})")
    return max(candidates)[2] if candidates else None
