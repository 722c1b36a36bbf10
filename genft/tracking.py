"""Metric logging behind one small interface: JSON lines plus CSV in the run folder (no service needed)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List


class RunLog:
    """Appends one record per round to log.jsonl; `to_csv` writes the same data as a table."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
