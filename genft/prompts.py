"""Prompt sets: the toy world's named splits or a text file with one prompt per line."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .config import ConfigError

MAX_PROMPT_CHARS = 1000


def load_prompts(spec: str, field_name: str = "prompts") -> List[str]:
    """Resolve `spec` to a non-empty list of prompts; errors name `field_name` and the fix."""
    if spec in ("toyworld:train", "toyworld:heldout"):
        from . import toyworld

        prompts = toyworld.train_prompts() if spec.endswith("train") else toyworld.heldout_prompts()
        return list(prompts)
    if spec.startswith("toyworld:"):
        raise ConfigError(f"{field_name}={spec!r}: the toy world has 'toyworld:train' and 'toyworld:heldout'")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"{field_name}={spec!r} is neither 'toyworld:train'/'toyworld:heldout' nor an existing file; "
            "give a text file with one prompt per line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field_name}={spec!r} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{field_name}={spec!r} holds no prompts; write one prompt per line ('#' starts a comment)")
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise ConfigError(f"{field_name}={spec!r}: prompt {i + 1} is {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
    return prompts
