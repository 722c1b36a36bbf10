"""Where the pretrained toy world lives on disk, how a complete copy is recognised, and build-on-first-use."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .derived import check_folder
from .pretrain import FORMAT_VERSION, META_FILE, PretrainConfig, pretrain

logger = logging.getLogger(__name__)
CACHE_NAME = f"toyworld-v{FORMAT_VERSION}"
# Files every complete world folder has; weights are also opened to catch truncation.
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def default_cache_dir() -> Path:
    """$GENFT_HOME/toyworld-vN, else $XDG_CACHE_HOME/genft/toyworld-vN, else ~/.cache/genft/toyworld-vN (N = format version)."""
    if os.environ.get("GENFT_HOME"):
        return Path(os.environ["GENFT_HOME"]).expanduser() / CACHE_NAME
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "genft" / CACHE_NAME
    return Path.home() / ".cache" / "genft" / CACHE_NAME


def validate_world(path: str | Path) -> dict:
    """Return the folder's genft_toyworld.json if it is a complete, current toy world; else raise ValueError saying what is wrong."""
    meta = check_folder(path, META_FILE, "format_version", FORMAT_VERSION, REQUIRED_FILES)
    try:
        json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from e
    return meta


def load_or_pretrain(
    cache_dir: str | Path | None = None, progress: bool = True, config: PretrainConfig | None = None
) -> Path:
    """Return the world folder `cache_dir` (default: default_cache_dir()), pretraining it first if absent or broken.

    `config` only matters when the world has to be (re)built; an existing valid folder is returned as is.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        validate_world(path)
        return path
    except ValueError as e:
        if path.exists():
            logger.warning("toy world at %s is unusable (%s); rebuilding it", path, e)
        else:
            logger.warning("no toy world at %s yet; pretraining it (about 6 minutes on 2 free CPU cores)", path)
    return pretrain(path, config=config, progress=progress)
