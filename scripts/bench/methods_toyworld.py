"""Before/after numbers of each method's toy-world recipe, from one command.

    OMP_NUM_THREADS=2 python scripts/bench/methods_toyworld.py [--recipes dpok_toyworld_flow ...] [--rounds 12] \
        [--out genft_runs/bench_methods]

Runs every recipe under scripts/recipes/ whose name is given (default: the flow-family issue's set:
Adjoint Matching on the diffusion, flow and mirror bases, FAIL-PD and FAIL-PG, DPOK on the mirror
base), each with the same round budget, and prints the optimised reward and the held-out oracle
before and after, wall time and reward queries. Numbers are those of this run only. Exits non-zero
only on a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import metric, run_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT = ["adjoint_matching_toyworld", "adjoint_matching_toyworld_flow", "adjoint_matching_toyworld_mirror",
           "fail_pd_toyworld_flow", "fail_pg_toyworld_flow", "dpok_toyworld_mirror"]


def fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT, help="Recipe names under scripts/recipes (without .yaml).")
    ap.add_argument("--rounds", type=int, default=0, help="Override num_rounds of every recipe (0: the recipe's own).")
    ap.add_argument("--eval-max-prompts", type=int, default=10, help="Held-out prompts per evaluation (0: all).")
    ap.add_argument("--out", default="genft_runs/bench_methods")
    args = ap.parse_args(argv)
    rows = []
    for name in args.recipes:
        overrides = [f"eval_max_prompts={args.eval_max_prompts}"] + ([f"num_rounds={args.rounds}"] if args.rounds else [])
        run = run_recipe(str(RECIPES / f"{name}.yaml"), Path(args.out) / name, overrides)
        cfg, res = run["config"], run["result"]
        reward = cfg.reward if isinstance(cfg.reward, str) else "+".join(cfg.reward)
        row = {"recipe": name, "method": cfg.method, "model": cfg.model, "reward": reward,
               "reward_before": metric(res["before"], reward), "reward_after": metric(res["after"], reward),
               "oracle_acc_before": metric(res["before"], "toy_oracle_accuracy"),
               "oracle_acc_after": metric(res["after"], "toy_oracle_accuracy"),
               "rounds": cfg.num_rounds, "queries": cfg.num_rounds * run["queries_per_round"], "seconds": round(run["seconds"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'recipe':34s} {'reward':16s} {'before':>7s} {'after':>7s} {'acc before':>10s} {'acc after':>9s} {'queries':>7s} {'s':>6s}")
    for r in rows:
        print(f"{r['recipe']:34s} {r['reward']:16s} {fmt(r['reward_before']):>7s} {fmt(r['reward_after']):>7s} "
              f"{fmt(r['oracle_acc_before']):>10s} {fmt(r['oracle_acc_after']):>9s} {r['queries']:>7d} {r['seconds']:>6.0f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "methods.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
