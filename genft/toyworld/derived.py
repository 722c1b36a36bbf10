"""Bases derived from the toy world (the flow, mirror-flow and LCM generators): one folder layout beside the
world, one validity check, one atomic save, one load-or-build.

Each base is a pipeline folder that reuses the world's tokenizer byte for byte, plus a metadata file
(`<meta_file>`) with its own format version, the world it came from, the world definition (palette,
held-out prompts) and its recipe and training stats. A folder that is missing files, has another format
version, was built for another world definition, or holds unreadable weights is rebuilt.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .._atomic import atomic_dir
from .data import PALETTE, heldout_prompts

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@dataclass(frozen=True)
class DerivedKind:
    """How one kind of derived base is named and recognised."""

    name: str  # 'flow', 'mirror', 'lcm': the folder is `<world folder>-<name>`
    meta_file: str
    version_key: str  # the metadata field holding the format version, e.g. 'flow_format_version'
    version: int
    required_files: Tuple[str, ...]
    build_note: str  # how long a build takes, for the log line


def default_dir(kind: DerivedKind, world_dir: str | Path | None = None) -> Path:
    """`<world folder>-<kind>`, beside the diffusion world (default: `default_cache_dir()`)."""
    from .cache import default_cache_dir

    world = Path(world_dir) if world_dir is not None else default_cache_dir()
    return world.with_name(f"{world.name}-{kind.name}")


def check_folder(path: str | Path, meta_file: str, version_key: str, version: int, required_files: Tuple[str, ...]) -> dict:
    """The metadata of a cached toy-world folder (the world itself or a derived base) if it is complete and current:
    every required file present, metadata readable at `version`, built for this world definition, weights
    readable. Otherwise a ValueError saying what is wrong."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist or is not a folder")
    missing = [f for f in (meta_file,) + tuple(required_files) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / meta_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get(version_key) != version:
        found = meta.get(version_key) if isinstance(meta, dict) else None
        raise ValueError(f"{path}: {version_key} {found!r}, this genft expects {version}")
    if meta.get("heldout_prompts") != heldout_prompts() or meta.get("palette") != {k: list(v) for k, v in PALETTE.items()}:
        raise ValueError(f"{path} was built for a different world definition (palette or held-out prompts differ)")
    for f in WEIGHT_FILES:
        try:
            load_file(str(path / f))
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            raise ValueError(f"{path / f} is corrupt ({type(e).__name__}: {e})") from e
    return meta


def validate(kind: DerivedKind, path: str | Path) -> dict:
    """The folder's metadata if it is a complete, current base of `kind`; else a ValueError saying what is wrong."""
    return check_folder(path, kind.meta_file, kind.version_key, kind.version, kind.required_files)


def save(kind: DerivedKind, pipe, out_dir: str | Path, world_dir: Path, world_meta: dict, config: Dict[str, Any],
         stats: Dict[str, Any], t_start: float, train_seconds: float, heldout: Any, versions: Dict[str, str]) -> Path:
    """Write `pipe` and its metadata in one rename, with the world's own tokenizer files."""
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
        shutil.rmtree(tmp / "tokenizer")  # the world's own files, byte for byte
        shutil.copytree(world_dir / "tokenizer", tmp / "tokenizer")
        meta = {kind.version_key: kind.version, "world": str(world_dir), "world_format_version": world_meta["format_version"],
                "palette": PALETTE, "heldout_prompts": heldout_prompts(), "config": config,
                "stats": {**stats, "train_seconds": round(train_seconds, 2),
                          "total_seconds": round(time.perf_counter() - t_start, 2), "heldout": heldout},
                "versions": versions}
        (tmp / kind.meta_file).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def load_or_build(kind: DerivedKind, cache_dir: str | Path | None, world_dir: str | Path | None, progress: bool,
                  build: Callable[[Path, Path], Path], check: Optional[Callable[[Path], dict]] = None) -> Path:
    """The base folder (default `<world>-<kind>`), built by `build(path, world)` first when absent or broken
    (the world too, if needed). `check` replaces `validate` for kinds with extra requirements."""
    from .cache import load_or_pretrain

    path = Path(cache_dir).expanduser() if cache_dir is not None else default_dir(kind, world_dir)
    try:
        (check or (lambda p: validate(kind, p)))(path)
        return path
    except ValueError as e:
        logger.warning("no usable toy %s base at %s (%s); building it (%s)", kind.name, path, e, kind.build_note)
    world = load_or_pretrain(world_dir, progress=progress)
    return build(path, world)
