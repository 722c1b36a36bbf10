"""Checkpoints, written atomically: weights (safetensors via save_pretrained), optimiser, method state
(replay buffers, per-prompt statistics), loop counters, extra stateful objects (EMA, LR scheduler) and
every process's RNG states (python `random`, numpy, torch CPU and CUDA), so a resumed run continues
bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ._atomic import atomic_dir
from .sharding import is_sharded, load_full_state

_COMPLETE = "COMPLETE"
_MANIFEST = "manifest.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete, or a file in it no longer matches its recorded size/hash."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256 so a later resume can detect truncation or bit rot."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (_MANIFEST, _COMPLETE))
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / _MANIFEST).write_text(json.dumps(entries, indent=1, sort_keys=True))


def verify_checkpoint(path: Path) -> None:
    """Raise CorruptCheckpointError naming the first missing, truncated or altered file."""
    path = Path(path)
    if not (path / _COMPLETE).is_file():
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is incomplete (no {_COMPLETE} marker): it was interrupted while being written")
    try:
        entries = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no readable {_MANIFEST} ({e})") from e
    for rel, meta in entries.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"checkpoint {str(path)!r} lost {rel}")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {str(path)!r}: {rel} does not match its recorded size/hash (corrupt)")


def capture_rng_state() -> Dict[str, Any]:
    """This process's global RNG states (python, numpy, torch CPU, every CUDA device) as tensors and plain values."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (CUDA states only where this process has CUDA)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"checkpoint holds CUDA RNG states for {len(cuda)} devices but this process sees "
                             f"{torch.cuda.device_count()}; resume on the same number of GPUs")
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, unet, optimizer: torch.optim.Optimizer, method_state: Dict[str, Any],
                    trainer_state: Dict[str, Any], stateful: Optional[Mapping[str, Any]] = None,
                    rng_states: Optional[Sequence[Mapping[str, Any]]] = None,
                    extra_writers: Optional[Mapping[str, Callable[[Path], None]]] = None,
                    model_state: Optional[Mapping[str, torch.Tensor]] = None, optimizer_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write a checkpoint folder in one rename; a COMPLETE marker is the last file written.

    `stateful` maps names to objects with `state_dict()` (EMA weights, an LR scheduler); `rng_states`
    holds one `capture_rng_state()` per process, in rank order. `extra_writers` maps a subfolder name
    to a function that fills it (e.g. LoRA adapters in diffusers' format): it is written inside the
    same temporary folder, so it is covered by the manifest and the single rename. `model_state` and
    `optimizer_state` replace the network's and optimiser's own state dicts (a sharded network's gathered
    full weights, and its optimiser state keyed by parameter name: genft.sharding).
    """
    with atomic_dir(path) as tmp:
        if model_state is None:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        else:  # the layout save_pretrained writes, from the gathered weights
            from safetensors.torch import save_file

            (tmp / "unet").mkdir()
            unet.save_config(tmp / "unet")
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"),
                      metadata={"format": "pt"})
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(method_state, tmp / "method_state.pt")
        if stateful:
            torch.save({name: obj.state_dict() for name, obj in stateful.items()}, tmp / "states.pt")
        if rng_states is not None:
            torch.save(list(rng_states), tmp / "rng_states.pt")
        for name, write in (extra_writers or {}).items():
            (tmp / name).mkdir()
            write(tmp / name)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        _write_manifest(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
    return path


def read_trainer_state(path: Path) -> Dict[str, Any]:
    """A checkpoint's trainer_state.json (round, counters, config, formats); {} when it cannot be read."""
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def is_complete(path: Path) -> bool:
    return (Path(path) / _COMPLETE).is_file() and (Path(path) / "trainer_state.json").is_file()


def load_checkpoint(path: Path, unet, optimizer: Optional[torch.optim.Optimizer],
                    stateful: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load weights, optimiser and each `stateful` object in place; returns {"trainer_state", "method_state", "rng_states"}.

    Every file is checked against the manifest before anything is loaded, so a corrupt checkpoint
    raises CorruptCheckpointError and leaves the model and optimiser untouched. A name in `stateful`
    that the checkpoint lacks raises ValueError; states the checkpoint has but nobody asks for are ignored.
    `rng_states` is the per-process list (None for checkpoints written without it); restoring it is the caller's choice.
    """
    path = Path(path)
    verify_checkpoint(path)
    from safetensors.torch import load_file

    # Read everything first, apply after: a refusal below leaves the model and optimiser as they were.
    weights = next((path / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    optim_state = torch.load(path / "optimizer.pt", weights_only=True) if optimizer is not None else None
    method_state = torch.load(path / "method_state.pt", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    saved_states = torch.load(path / "states.pt", weights_only=True) if (path / "states.pt").is_file() else {}
    rng_states = torch.load(path / "rng_states.pt", weights_only=True) if (path / "rng_states.pt").is_file() else None
    missing_states = sorted(set(stateful or {}) - set(saved_states))
    if missing_states:
        raise ValueError(f"checkpoint {str(path)!r} has no saved state for {missing_states} (it holds {sorted(saved_states)}); "
                         "resume with the same settings it was written with (e.g. the same EMA/scheduler options)")
    expected = set(unet.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    by_name = trainer_state.get("optimizer_format") == "by_name"
    if is_sharded(unet) or by_name:
        if optimizer is not None and not by_name:
            raise ValueError(f"checkpoint {str(path)!r} was written without fsdp: its optimiser state cannot be loaded into "
                             "a sharded model; resume it with fsdp=false")
        load_full_state(unet, state, optimizer, optim_state)
    else:
        unet.load_state_dict(state, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
    for name, obj in (stateful or {}).items():
        obj.load_state_dict(saved_states[name])
    return {"trainer_state": trainer_state, "method_state": method_state, "rng_states": rng_states}


def checkpoints_newest_first(checkpoints_dir: Path, log=print) -> List[Path]:
    """Checkpoint folders under `checkpoints_dir`, newest round first; unreadable ones are skipped with a message."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
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
    return [p for _, _, p in sorted(candidates, reverse=True)]


def latest_checkpoint(checkpoints_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that passes `verify_checkpoint`; newer corrupt ones are skipped with a message."""
    for p in checkpoints_newest_first(checkpoints_dir, log):
        try:
            verify_checkpoint(p)
            return p
        except CorruptCheckpointError as e:
            log(f"genft: {e}; falling back to the previous checkpoint")
    return None
