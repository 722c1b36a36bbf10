"""Sample efficiency: reward queries each finetuner spends to reach one fixed toy-world reward target.

    OMP_NUM_THREADS=2 python scripts/bench/sample_efficiency.py [--methods dpok adjoint_matching grpo rocm] \
        [--rounds 12] [--delta 0.03] [--target T] [--out genft_runs/bench_sample_efficiency]

Every method optimises the same reward (the toy world's differentiable proxy CLIP, so first-order
methods qualify) from the same pretrained toy world: the diffusion base, or for consistency methods
the LCM distilled from it. Each runs its recipe under scripts/recipes/ with the same round budget.
A query is one scored rollout sample (see scripts/bench/_runs.py). The target is fixed across
methods: `--target`, or else the highest first-round rollout reward of all methods plus `--delta`,
so every method must improve on every starting point. Rewards are smoothed over 3 rounds. Numbers
are those of this run only; exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import queries_to_reach, run_recipe, smoothed  # noqa: E402

from genft.methods import METHODS  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_OF = {"dpok": "dpok_toyworld", "adjoint_matching": "adjoint_matching_toyworld", "grpo": "grpo_toyworld",
             "rocm": "rocm_toyworld"}
REWARD = "toy_proxy_clip"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=[m for m in RECIPE_OF if m in METHODS and (RECIPES / f"{RECIPE_OF[m]}.yaml").is_file()])
    ap.add_argument("--rounds", type=int, default=12, help="Rounds per method (same prompts and samples per round as its recipe).")
    ap.add_argument("--delta", type=float, default=0.03, help="Target = max first-round reward + delta (ignored with --target).")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--window", type=int, default=3, help="Rounds in the trailing mean of the rollout reward.")
    ap.add_argument("--out", default="genft_runs/bench_sample_efficiency")
    args = ap.parse_args(argv)
    runs = {}
    for m in args.methods:
        recipe = RECIPES / f"{RECIPE_OF.get(m, m)}.yaml"
        overrides = [f"num_rounds={args.rounds}", f"reward={REWARD}", "eval_max_prompts=4", "eval_images_per_prompt=1",
                     "eval_rewards=[toy_oracle_accuracy]"]
        run = run_recipe(str(recipe), Path(args.out) / m, overrides)
        curve = [r["reward_mean"] for r in run["rounds"]]
        runs[m] = {"curve": curve, "queries_per_round": run["queries_per_round"], "seconds": round(run["seconds"], 1),
                   "model": run["config"].model}
        print(json.dumps({"method": m, **runs[m]}), flush=True)
    target = args.target if args.target is not None else max(r["curve"][0] for r in runs.values()) + args.delta
    print(f"\ntarget rollout reward ({REWARD}, {args.window}-round mean): {target:.4f}")
    print(f"{'method':18s} {'model':16s} {'first':>7s} {'last':>7s} {'queries to target':>18s} {'budget':>7s} {'s':>6s}")
    table = []
    for m, r in runs.items():
        smooth = smoothed(r["curve"], args.window)
        q = queries_to_reach(r["curve"], target, r["queries_per_round"], args.window)
        budget = len(r["curve"]) * r["queries_per_round"]
        table.append({"method": m, "model": r["model"], "first": r["curve"][0], "last_smoothed": smooth[-1],
                      "queries_to_target": q, "budget": budget, "seconds": r["seconds"]})
        print(f"{m:18s} {r['model']:16s} {r['curve'][0]:7.4f} {smooth[-1]:7.4f} {str(q) if q else f'> {budget}':>18s} "
              f"{budget:7d} {r['seconds']:6.0f}")
    reached = {t["method"]: t["queries_to_target"] for t in table if t["queries_to_target"]}
    if "dpok" in runs:
        dpok_budget = len(runs["dpok"]["curve"]) * runs["dpok"]["queries_per_round"]
        for m, q in reached.items():
            if m == "dpok":
                continue
            if "dpok" in reached:
                print(f"{m}: {q} queries to the target, DPOK {reached['dpok']}: {reached['dpok'] / q:.1f}x fewer")
            else:
                print(f"{m}: {q} queries to the target, DPOK did not reach it in {dpok_budget}: at least {dpok_budget / q:.1f}x fewer")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sample_efficiency.json").write_text(json.dumps({"target": target, "runs": runs, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
