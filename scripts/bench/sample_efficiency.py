"""Sample efficiency: reward queries each finetuner spends to raise a held-out toy-world reward by a fixed amount.

    OMP_NUM_THREADS=2 python scripts/bench/sample_efficiency.py [--methods dpok grpo rocm adjoint_matching] \
        [--rounds 16] [--gain 0.05] [--eval-every 2] [--out genft_runs/bench_sample_efficiency]

Every method optimises the same reward (the toy world's differentiable proxy CLIP, so first-order
methods qualify) from the same pretrained toy world: the diffusion base, or for consistency methods
the LCM distilled from it. Each runs its recipe under scripts/recipes/ with the same round budget.

The target is a gain of `--gain` in the reward's mean on a fixed held-out set (the same prompts and
seeds at every evaluation, every `--eval-every` rounds), over the method's own value before
training: rollout rewards move with each round's random prompts far more than with training, and
the consistency base starts from another sampler. A query is one scored rollout sample (see
scripts/bench/_runs.py); evaluation samples are not counted. The held-out oracle accuracy at the end
is printed beside it, to catch a gain bought by hacking the proxy. Numbers are those of this run
only; exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_curve, metric, queries_to_gain, run_recipe  # noqa: E402

from genft.methods import METHODS  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_OF = {"dpok": "dpok_toyworld", "grpo": "grpo_toyworld", "rocm": "rocm_toyworld", "adjoint_matching": "adjoint_matching_toyworld"}
REWARD = "toy_proxy_clip"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=[m for m in RECIPE_OF if m in METHODS and (RECIPES / f"{RECIPE_OF[m]}.yaml").is_file()])
    ap.add_argument("--rounds", type=int, default=16, help="Rounds per method (same prompts and samples per round as its recipe).")
    ap.add_argument("--gain", type=float, default=0.05, help="Held-out reward gain over the method's own start that counts as reached.")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-prompts", type=int, default=10, help="Held-out prompts per evaluation (2 images each).")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Extra config overrides for every method.")
    ap.add_argument("--out", default="genft_runs/bench_sample_efficiency")
    args = ap.parse_args(argv)
    table = []
    for m in args.methods:
        recipe = RECIPES / f"{RECIPE_OF.get(m, m)}.yaml"
        overrides = [f"num_rounds={args.rounds}", f"reward={REWARD}", f"eval_every={args.eval_every}",
                     f"eval_max_prompts={args.eval_prompts}", "eval_images_per_prompt=2", "eval_rewards=[toy_oracle_accuracy]", *args.set]
        run = run_recipe(str(recipe), Path(args.out) / m, overrides)
        curve = eval_curve(run["records"], REWARD)
        row = {"method": m, "model": run["config"].model, "curve": curve, "queries_per_round": run["queries_per_round"],
               "queries_to_gain": queries_to_gain(curve, args.gain, run["queries_per_round"]),
               "budget": args.rounds * run["queries_per_round"], "seconds": round(run["seconds"], 1),
               "oracle_acc_before": metric(run["result"]["before"], "toy_oracle_accuracy"),
               "oracle_acc_after": metric(run["result"]["after"], "toy_oracle_accuracy")}
        table.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nheld-out {REWARD}: queries to a gain of {args.gain} over each method's start ({args.eval_prompts} prompts x 2 fixed seeds)")
    print(f"{'method':18s} {'model':14s} {'start':>7s} {'end':>7s} {'queries':>9s} {'budget':>7s} {'acc before':>10s} {'acc after':>9s} {'s':>6s}")
    for r in table:
        q = str(r["queries_to_gain"]) if r["queries_to_gain"] else f"> {r['budget']}"
        print(f"{r['method']:18s} {r['model']:14s} {r['curve'][0][1]:7.4f} {r['curve'][-1][1]:7.4f} {q:>9s} {r['budget']:7d} "
              f"{r['oracle_acc_before']:10.3f} {r['oracle_acc_after']:9.3f} {r['seconds']:6.0f}")
    dpok = next((r for r in table if r["method"] == "dpok"), None)
    if dpok is not None:
        for r in table:
            if r is dpok or not r["queries_to_gain"]:
                continue
            if dpok["queries_to_gain"]:
                print(f"{r['method']}: {dpok['queries_to_gain'] / r['queries_to_gain']:.1f}x fewer queries than DPOK")
            else:
                print(f"{r['method']}: at least {dpok['budget'] / r['queries_to_gain']:.1f}x fewer queries than DPOK "
                      f"(DPOK did not reach the gain in {dpok['budget']})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sample_efficiency.json").write_text(json.dumps({"gain": args.gain, "reward": REWARD, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
