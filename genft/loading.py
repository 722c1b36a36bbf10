"""Build a method's config from YAML plus `key=value` overrides (the CLI's and the API's single entry)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from .config import ConfigError, parse_overrides, read_yaml
from .methods import get_method
from .train_config import TrainConfig


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """The config for the YAML at `path` (optional), then `overrides` ("key=value"), then `values`.

    `method` (default 'dpok') picks the config class; unknown keys anywhere are refused.
    """
    data: Dict[str, Any] = read_yaml(path) if path is not None else {}
    data.update(parse_overrides(overrides))
    data.update(values)
    method = data.get("method", "dpok")
    if not isinstance(method, str):
        raise ConfigError(f"method={method!r} must be a method name such as 'dpok'")
    return get_method(method).config_class.from_dict(data)
