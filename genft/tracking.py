"""Metric logging: log.jsonl in the run folder always, plus one optional tracker behind a two-method interface.

Trackers by name: 'none', 'csv' (tracker.csv beside log.jsonl), 'tensorboard' (needs the `tensorboard`
package) and 'wandb' (imported only when chosen; never required). `make_tracker` also accepts an instance
or a 'module:Class' path.
"""
from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from .config import ConfigError

TRACKERS = ("none", "csv", "tensorboard", "wandb")


class Tracker:
    """Receives every logged record; `log(record, step)` per record, `close()` once at the end."""

    name = "none"

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Record `record` (str keys, JSON values) at `step` (the training round)."""

    def close(self) -> None:
        """Flush and release files, writers or runs."""


class CSVTracker(Tracker):
    """Appends rows to out_dir/tracker.csv (kept on resume); the header grows (file rewritten) when new keys appear."""

    name = "csv"

    def __init__(self, out_dir: Union[str, Path], filename: str = "tracker.csv"):
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: List[Dict[str, Any]] = []
        self.keys: List[str] = ["step"]
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or ["step"])
                self.rows = list(reader)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        row = {"step": step, **record}
        new = [k for k in row if k not in self.keys]
        self.rows.append(row)
        if new or not self.path.exists():
            self.keys += new
            with self.path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.keys)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.keys).writerow(row)


def _scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """The record's finite numbers (bools and strings left out), for trackers that plot scalars."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class TensorBoardTracker(Tracker):
    """Scalars to a TensorBoard event file in out_dir/tensorboard (torch.utils.tensorboard; needs `tensorboard`)."""

    name = "tensorboard"

    def __init__(self, out_dir: Union[str, Path]):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        prefix = f"{record['event']}/" if isinstance(record.get("event"), str) and record["event"] != "eval" else ""
        for k, v in _scalars(record).items():
            if k != "round":
                self.writer.add_scalar(prefix + k, v, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Scalars to a Weights & Biases run (wandb imported here, only when this tracker is chosen)."""

    name = "wandb"

    def __init__(self, out_dir: Union[str, Path], config: Optional[Mapping[str, Any]] = None,
                 project: str = "genft", **init_kwargs: Any):
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(project=project, dir=str(out_dir), config=dict(config or {}), **init_kwargs)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"tracker {module!r} needs the {package!r} package: pip install {package} "
                          "(or use tracker=csv / tracker=none, which need nothing)") from e


_FACTORIES: Dict[str, Callable[..., Tracker]] = {
    "none": lambda out_dir, config=None: Tracker(),
    "csv": lambda out_dir, config=None: CSVTracker(out_dir),
    "tensorboard": lambda out_dir, config=None: TensorBoardTracker(out_dir),
    "wandb": lambda out_dir, config=None: WandbTracker(out_dir, config),
}


def check_tracker(spec: Union[str, Tracker]) -> None:
    """Raise ConfigError for an unknown tracker name, or one whose package is missing (call it before sampling)."""
    if isinstance(spec, Tracker) or (isinstance(spec, str) and ":" in spec):
        return
    if spec not in _FACTORIES:
        raise ConfigError(f"unknown tracker {spec!r}; valid: {', '.join(TRACKERS)} (or 'module:Class')")
    if spec in ("tensorboard", "wandb"):
        try:
            _require(spec, spec)
        except ImportError as e:
            raise ConfigError(f"tracker={spec!r}: {e}") from e


def make_tracker(spec: Union[str, Tracker], out_dir: Union[str, Path], config: Optional[Mapping[str, Any]] = None) -> Tracker:
    """A tracker from a name in TRACKERS, a 'module:Class' path (called with out_dir), or an instance (returned as is)."""
    if isinstance(spec, Tracker):
        return spec
    check_tracker(spec)
    if ":" in spec:
        module, _, attr = spec.partition(":")
        tracker = getattr(importlib.import_module(module), attr)(out_dir)
        if not isinstance(tracker, Tracker):
            raise TypeError(f"tracker {spec!r} built a {type(tracker).__name__}, not a genft.tracking.Tracker")
        return tracker
    return _FACTORIES[spec](out_dir, config)


class RunLog:
    """Appends one record per round to log.jsonl (what the gallery reads) and forwards it to `tracker`."""

    def __init__(self, out_dir: Path, tracker: Optional[Tracker] = None):
        self.path = Path(out_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker if tracker is not None else Tracker()

    def log(self, record: Dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record, step=int(record.get("round", 0)))

    def close(self) -> None:
        """Close the tracker (log.jsonl needs no closing)."""
        self.tracker.close()

    def records(self) -> List[Dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def to_csv(self) -> Path:
        rows = self.records()
        out = self.path.with_suffix(".csv")
        keys = sorted({k for r in rows for k in r})
        with out.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        return out
