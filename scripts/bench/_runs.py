"""Shared by the training benchmarks: run one recipe through `genft.Trainer` and read its reward curve back.

Reward queries are counted from the run's own log: each round scores `prompts_per_round x
samples_per_prompt` rollout samples (first-order methods differentiate the reward at the same
samples, which counts as the same query). Evaluation samples are not counted: they use held-out
prompts and rewards and do not feed the update.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from genft.loading import load_config
from genft.trainer import Trainer


def run_recipe(recipe: str, output_dir: Path, overrides: Sequence[str] = (), **values) -> Dict:
    """Train the recipe (with `key=value` overrides) and return its result, per-round log and wall time."""
    config = load_config(recipe, list(overrides), output_dir=str(output_dir), progress=False, **values)
    t0 = time.perf_counter()
    result = Trainer(config).train()
    seconds = time.perf_counter() - t0
    records = read_log(output_dir)
    rounds = [r for r in records if "reward_mean" in r]
    return {"config": config, "result": result, "rounds": rounds, "records": records, "seconds": seconds,
            "queries_per_round": config.prompts_per_round * config.samples_per_prompt}


def read_log(output_dir: Path) -> List[Dict]:
    """The records of output_dir/log.jsonl, in order."""
    path = Path(output_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(records: Sequence[Dict], reward: str) -> List[Tuple[int, float]]:
    """(round, held-out mean of `reward`) at every evaluation of a run, 'before' first (round 0)."""
    return [(int(r["round"]), float(r[f"eval/{reward}"])) for r in records if r.get("event") == "eval" and f"eval/{reward}" in r]


def queries_to_gain(curve: Sequence[Tuple[int, float]], gain: float, queries_per_round: int) -> Optional[int]:
    """Reward queries spent when the held-out reward first exceeds its value before training by `gain` (None: never)."""
    if not curve:
        return None
    start = curve[0][1]
    for round_index, value in curve[1:]:
        if value >= start + gain:
            return round_index * queries_per_round
    return None


def metric(result: Optional[Dict], name: str) -> Optional[float]:
    """Mean of one evaluation metric from a Trainer result ('before'/'after' entry), or None."""
    if not result:
        return None
    entry = result.get("metrics", {}).get(name)
    return None if entry is None else float(entry["mean"])
