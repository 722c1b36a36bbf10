"""Reward hacking on the toy world: GRPO (β=0), GRPO with a fixed KL, and GARDO, on one proxy reward and one budget.

    OMP_NUM_THREADS=1 python scripts/gardo_toyworld.py --out genft_runs/gardo_toyworld
    # the hackable proxy, three seeds, GARDO's ablations (about 4 CPU-minutes per arm and seed):
    OMP_NUM_THREADS=1 python scripts/gardo_toyworld.py --ink-weight 3 --aux clip --seeds 0 1 2 \
        --arms baseline kl gardo gardo_fixed_reference gardo_code_sign gardo_no_diversity diversity_only
    # the six-seed table of BENCHMARKS.md (groups of 8, β 0.2, 240 images per evaluation; about 3.5 min a run):
    OMP_NUM_THREADS=1 python scripts/gardo_toyworld.py --ink-weight 3 --aux clip --group-size 8 --kl-weight 0.2 \
        --eval-prompts 30 --images-per-prompt 8 --eval-every 3 --seeds 0 1 2 3 4 5 --arms baseline kl gardo

Every arm optimises `toy_proxy_clip`, the toy world's learned CLIP proxy (`--proxy-steps N` swaps in a
weaker proxy: the same recipe stopped after N contrastive steps). Held out and never used in training:
`toy_oracle_accuracy` (does the image show the prompt's digit and colours, per the fixed oracle) and a
diversity measure (mean pairwise distance between a prompt's images in the oracle's unit-length 8x8 stroke
mask, `genft.features.ToyStrokeFeatures` and `genft.metrics.diversity_within_prompt`: how different the
handwriting is, not how much ink it has), both on fixed-seed samples of held-out prompts every
`--eval-every` rounds.

`--ink-weight W` makes the proxy hackable: it optimises `toy_proxy_clip + W * toy_ink`, where `toy_ink`
(the fraction of the image painted in the prompt's stroke colour) agrees with the truth on clean renders
but is maximised by a blob that hides the digit, like the saturation bias of aesthetic predictors.

GARDO's auxiliary rewards (`--aux`) are a second proxy CLIP trained with another seed (an independent
estimate of the alignment objective, so rank disagreement is epistemic uncertainty) and
`jpeg_compressibility` (a generic image prior: noisy, artefact-laden images compress badly; it agrees
with the ink hack, since flat blobs compress well, so the hackable runs use the CLIP alone). Its
diversity features come from the proxy CLIP's image tower, never from the oracle. Ablations of GARDO:
`gardo_fixed_reference` (the pretrained model stays the KL reference), `gardo_code_sign` (the released
code's uncertainty sign, which gates samples the proxy under-rates), `gardo_no_diversity` (the base
advantage) and `diversity_only` (the diversity-aware advantage on the unregularised baseline, β = 0).

Writes, under --out, seed<s>/<arm>/ (the runs), summary.md, summary.csv, curves.csv and curves.png. Arms and
seeds can be trained as parallel processes (one `--arms X --seeds S` each, same --out) and tabulated with
`--report-only`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch

import genft
from genft.config import parse_overrides
from genft.features import load_features, load_images
from genft.metrics import diversity_within_prompt
from genft.toyworld.proxy import ProxyConfig, load_or_train_proxy

ARMS = ("baseline", "kl", "gardo", "gardo_fixed_reference", "gardo_code_sign", "gardo_no_diversity", "diversity_only")
LABELS = {"baseline": "GRPO, no KL (β=0)", "kl": "GRPO, fixed KL", "gardo": "GARDO (GRPO)",
          "gardo_fixed_reference": "GARDO, no reference reset", "gardo_code_sign": "GARDO, code's uncertainty sign",
          "gardo_no_diversity": "GARDO, no diversity advantage", "diversity_only": "GRPO + diversity advantage only (β=0)"}
#: GARDO overrides of the ablation arms.
ABLATIONS = {"gardo": {}, "gardo_fixed_reference": {"adaptive_reference": False},
             "gardo_code_sign": {"uncertainty_sign": "reference_code"}, "gardo_no_diversity": {"diversity_advantage": False},
             "diversity_only": {"kl_weight": 0.0, "gated_kl": False, "adaptive_reference": False}}
#: Held-out measures compared seed by seed against the baseline.
PAIRED = (("oracle_acc_final", "oracle acc final"), ("diversity_final", "diversity final"),
          ("oracle_acc_at_matched", "oracle acc at matched"), ("diversity_at_matched", "diversity at matched"),
          ("oracle_acc_over_range", "oracle acc over shared range"), ("diversity_over_range", "diversity over shared range"))


def proxy_folder(steps: int, seed: int) -> Path:
    """The toy proxy recipe with `steps` steps (0: 700) and `seed`, cached beside the toy world; (0, 0) is the default proxy."""
    if steps == 0 and seed == 0:
        return load_or_train_proxy(progress=False)
    steps = steps or ProxyConfig().steps
    folder = Path.home() / ".cache" / "genft" / f"toyworld-v2-proxy-s{steps}-seed{seed}"
    return load_or_train_proxy(folder, progress=False, config=ProxyConfig(steps=steps, seed=seed))


def arm_config(arm: str, args, seed: int, proxy: Path, aux_proxy: Path, out: Path):
    """The training config of one arm; everything but the regulariser is shared."""
    reward = {"toy_proxy_clip": 1.0, "toy_ink": args.ink_weight} if args.ink_weight else "toy_proxy_clip"
    common = dict(
        model="toyworld", reward=reward, reward_options={"toy_proxy_clip": {"path": str(proxy)}},
        eval_rewards=["toy_oracle_accuracy"] + ([] if args.ink_weight else ["toy_ink"]), prompts="toyworld:train", eval_prompts="toyworld:heldout",
        output_dir=str(out / arm), seed=seed, num_inference_steps=args.steps, guidance_scale=1.0, eta=1.0,
        num_rounds=args.rounds, prompts_per_round=32 // args.group_size, samples_per_prompt=args.group_size,
        train_batch_size=16, gradient_accumulation=1,
        learning_rate=args.lr, clip_range=args.clip_range, timestep_fraction=args.timestep_fraction, inner_epochs=args.inner_epochs,
        eval_every=args.eval_every, eval_max_prompts=args.eval_prompts, eval_images_per_prompt=args.images_per_prompt, progress=False,
    )
    if arm == "baseline":
        return genft.load_config(method="grpo", kl_weight=0.0, **common)
    if arm == "kl":
        return genft.load_config(method="grpo", kl_weight=args.kl_weight, **common)
    aux = "genft.toyworld.proxy:ToyProxyCLIPScore"
    aux_rewards = [{"clip": aux, "jpeg": "jpeg_compressibility"}[name] for name in args.aux]
    gardo = dict(
        method="gardo_grpo", kl_weight=args.kl_weight, aux_rewards=aux_rewards,
        aux_reward_options={aux: {"path": str(aux_proxy)}}, reference_kl_threshold=args.reference_kl_threshold,
        reference_reset_every=args.reset_every, diversity_features="toy_proxy_clip", diversity_std=True)
    return genft.load_config(**{**common, **gardo, **ABLATIONS[arm], **parse_overrides(args.gardo_set)})


def eval_points(run_dir: Path, features, ink_weight: float = 0.0) -> List[Dict]:
    """Proxy (the optimised sum), ink, oracle accuracy and diversity of every saved evaluation of a run, in round order."""
    rows = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "eval":
            continue
        folder = run_dir / "evals" / rec["tag"]
        samples = json.loads((folder / "samples.json").read_text())["samples"]
        images = load_images([folder / s["file"] for s in samples], (16, 16))
        div = diversity_within_prompt(features(images), [s["prompt"] for s in samples])["mean"]
        rows.append({"round": rec["round"], "proxy": rec["eval/toy_proxy_clip"] + ink_weight * rec["eval/toy_ink"],
                     "clip": rec["eval/toy_proxy_clip"], "ink": rec["eval/toy_ink"],
                     "oracle_accuracy": rec["eval/toy_oracle_accuracy"], "diversity": div})
    return rows


def at_proxy_level(points: List[Dict], level: float) -> Dict:
    """Oracle accuracy and diversity where a run's eval proxy first reaches `level` (linear interpolation between evals)."""
    for prev, cur in zip(points, points[1:]):
        if cur["proxy"] >= level > prev["proxy"]:
            w = (level - prev["proxy"]) / (cur["proxy"] - prev["proxy"])
            return {k: prev[k] + w * (cur[k] - prev[k]) for k in ("round", "oracle_accuracy", "diversity")}
    if points and points[0]["proxy"] >= level:
        return {k: points[0][k] for k in ("round", "oracle_accuracy", "diversity")}
    return {"round": float("nan"), "oracle_accuracy": float("nan"), "diversity": float("nan")}


def over_proxy_range(points: List[Dict], low: float, high: float, levels: int = 11) -> Dict:
    """Oracle accuracy and diversity averaged over `levels` evenly spaced proxy levels in [low, high], each read where
    the run first reaches it: a comparison at equal proxy that uses the whole shared stretch of the curves, not one point."""
    if high <= low:
        return at_proxy_level(points, low)
    hits = [at_proxy_level(points, low + (high - low) * i / (levels - 1)) for i in range(levels)]
    return {k: sum(h[k] for h in hits) / levels for k in ("round", "oracle_accuracy", "diversity")}


def by_proxy_bins(curves: Dict[str, List[List[Dict]]], width: float = 0.1) -> List[Dict]:
    """Oracle accuracy and diversity at equal proxy over whole curves, not first crossings: every evaluation after
    round 0 of every seed, pooled per arm into proxy bins `width` wide; per bin and arm the count and the means."""
    points = {arm: [p for pts in runs for p in pts[1:]] for arm, runs in curves.items()}
    proxies = [p["proxy"] for pts in points.values() for p in pts]
    if not proxies:
        return []
    start = math.floor(min(proxies) / width) * width
    bins = []
    for i in range(math.ceil((max(proxies) - start) / width) + 1):
        low, high = start + i * width, start + (i + 1) * width
        cells = {}
        for arm, pts in points.items():
            mine = [p for p in pts if low <= p["proxy"] < high]
            if mine:
                cells[arm] = {"n": len(mine), "oracle_accuracy": sum(p["oracle_accuracy"] for p in mine) / len(mine),
                              "diversity": sum(p["diversity"] for p in mine) / len(mine)}
        if cells:
            bins.append({"low": low, "high": high, "arms": cells})
    return bins


def diversity_beyond_ink(curves: Dict[str, List[List[Dict]]]) -> Dict:
    """How much of the held-out diversity the ink explains: a least-squares line diversity ≈ a + b·ink over every
    evaluation of every run, its correlation r, and per arm the seeds' mean residual over their evaluations after
    round 0 (diversity kept beyond what the run's ink predicts)."""
    points = [p for runs in curves.values() for pts in runs for p in pts]
    x = torch.tensor([p["ink"] for p in points], dtype=torch.float64)
    y = torch.tensor([p["diversity"] for p in points], dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    slope = float((xc * yc).sum() / (xc * xc).sum().clamp(min=1e-12))
    intercept = float(y.mean() - slope * x.mean())
    r = float((xc * yc).sum() / ((xc * xc).sum() * (yc * yc).sum()).sqrt().clamp(min=1e-12))
    residuals = {arm: [sum(p["diversity"] - intercept - slope * p["ink"] for p in pts[1:]) / max(len(pts) - 1, 1) for pts in runs]
                 for arm, runs in curves.items()}
    return {"intercept": intercept, "slope": slope, "r": r, "residuals": residuals}


def plot(curves: Dict[str, List[Dict]], path: Path) -> bool:
    """Proxy, oracle accuracy and diversity over rounds, and the two held-out measures against proxy; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 6, figsize=(26, 4))
    for arm, pts in curves.items():
        r = [p["round"] for p in pts]
        for ax, key in zip(axes[:4], ("proxy", "ink", "oracle_accuracy", "diversity")):
            ax.plot(r, [p[key] for p in pts], marker="o", label=LABELS[arm])
        for ax, key in zip(axes[4:], ("oracle_accuracy", "diversity")):
            ax.plot([p["proxy"] for p in pts], [p[key] for p in pts], marker="o", label=LABELS[arm])
    titles = ("proxy reward (optimised)", "ink in the stroke colour", "oracle accuracy (held out)", "diversity (held out)",
              "oracle accuracy vs proxy", "diversity vs proxy")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("proxy reward" if "vs" in title else "round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mean_curve(runs: List[List[Dict]]) -> List[Dict]:
    """The seeds' eval curves averaged point by point (every run evaluates at the same rounds)."""
    keys = ("round", "proxy", "ink", "oracle_accuracy", "diversity")
    return [{k: sum(pts[i][k] for pts in runs) / len(runs) for k in keys} for i in range(min(len(p) for p in runs))]


def summarise(arm: str, seed: int, pts: List[Dict], level: float, seconds: float) -> Dict:
    """One run's row: start, end and matched-proxy values (at `level`, and averaged from the start proxy up to it), and
    how much accuracy it lost per unit of proxy gained."""
    first, last, matched = pts[0], pts[-1], at_proxy_level(pts, level)
    shared = over_proxy_range(pts, first["proxy"], level)
    gain = last["proxy"] - first["proxy"]
    return {"arm": arm, "seed": seed, "seconds": round(seconds),
            "proxy_before": first["proxy"], "proxy_final": last["proxy"], "proxy_max": max(p["proxy"] for p in pts),
            "ink_before": first["ink"], "ink_final": last["ink"],
            "oracle_acc_before": first["oracle_accuracy"], "oracle_acc_final": last["oracle_accuracy"],
            "diversity_before": first["diversity"], "diversity_final": last["diversity"],
            "acc_lost_per_proxy": (first["oracle_accuracy"] - last["oracle_accuracy"]) / gain if gain > 0 else float("nan"),
            "matched_proxy": level, "matched_round": matched["round"], "oracle_acc_at_matched": matched["oracle_accuracy"],
            "diversity_at_matched": matched["diversity"], "oracle_acc_over_range": shared["oracle_accuracy"],
            "diversity_over_range": shared["diversity"]}


def _mean_sd(values: List[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def report(rows: List[Dict], args, seconds_total: float) -> List[str]:
    """Markdown: the mean over seeds per arm, then every run."""
    proxy_name = f"toy_proxy_clip + {args.ink_weight:g} toy_ink" if args.ink_weight else "toy_proxy_clip"
    lines = [f"# Reward hacking on the toy world ({args.rounds} rounds × 32 samples in groups of {args.group_size}, lr {args.lr}, β {args.kl_weight}, "
             f"proxy {proxy_name}, CLIP {args.proxy_steps or 700} steps, seeds {args.seeds})", "",
             "Mean ± sd over seeds (final = the last evaluation; held-out prompts, fixed seeds). 'acc lost per proxy' is "
             "(oracle accuracy before − final) / (proxy final − before): the hacking rate.", "",
             "| method | proxy final | ink final | oracle acc final | diversity final | acc lost per proxy | "
             "oracle acc at matched proxy | diversity at matched proxy |", "|---|---|---|---|---|---|---|---|"]
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        cols = ("proxy_final", "ink_final", "oracle_acc_final", "diversity_final", "acc_lost_per_proxy",
                "oracle_acc_at_matched", "diversity_at_matched")
        lines.append(f"| {LABELS[arm]} | " + " | ".join(_mean_sd([r[c] for r in mine]) for c in cols) + " |")
    if "baseline" in args.arms and len(args.arms) > 1:
        lines += ["", "Paired by seed, each arm minus the baseline: mean ± sd of the difference (seeds where it is > 0). "
                  "'Matched' reads a run where it first reaches the highest proxy every arm of its seed reaches; 'over shared "
                  "range' averages 11 such readings from the starting proxy up to that level.", "",
                  "| method | " + " | ".join(label for _, label in PAIRED) + " |", "|---|" + "---|" * len(PAIRED)]
        base = {r["seed"]: r for r in rows if r["arm"] == "baseline"}
        for arm in args.arms:
            if arm == "baseline":
                continue
            mine = [r for r in rows if r["arm"] == arm and r["seed"] in base]
            cells = []
            for key, _ in PAIRED:
                diffs = [r[key] - base[r["seed"]][key] for r in mine]
                diffs = [d for d in diffs if d == d]
                cells.append(f"{_mean_sd(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Every run (matched proxy: the highest eval proxy every arm of that seed reaches; values where a run first reaches it):", "",
              "| method | seed | proxy before → final (max) | ink before → final | oracle acc before → final | diversity before → final | "
              "matched proxy | round at matched | oracle acc at matched | diversity at matched | oracle acc over shared range | "
              "diversity over shared range | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['arm']]} | {r['seed']} | {r['proxy_before']:.3f} → {r['proxy_final']:.3f} ({r['proxy_max']:.3f}) | "
                     f"{r['ink_before']:.3f} → {r['ink_final']:.3f} | {r['oracle_acc_before']:.3f} → {r['oracle_acc_final']:.3f} | "
                     f"{r['diversity_before']:.3f} → {r['diversity_final']:.3f} | {r['matched_proxy']:.3f} | {r['matched_round']:.1f} | "
                     f"{r['oracle_acc_at_matched']:.3f} | {r['diversity_at_matched']:.3f} | {r['oracle_acc_over_range']:.3f} | "
                     f"{r['diversity_over_range']:.3f} | {r['seconds']} |")
    lines += ["", f"Training time {seconds_total:.0f} s over all runs. Settings: {json.dumps(vars(args))}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="genft_runs/gardo_toyworld")
    ap.add_argument("--arms", nargs="+", default=["baseline", "kl", "gardo"], choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=4, choices=[2, 4, 8, 16, 32],
                    help="Samples per prompt (GRPO's group); the round is always 32 samples.")
    ap.add_argument("--steps", type=int, default=10, help="Sampler steps per rollout.")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--clip-range", type=float, default=1e-3)
    ap.add_argument("--inner-epochs", type=int, default=2, help="Passes over each round's samples.")
    ap.add_argument("--timestep-fraction", type=float, default=0.5, help="Fraction of sampler steps (from the noise end) trained on.")
    ap.add_argument("--kl-weight", type=float, default=0.04, help="β of the fixed-KL arm and of GARDO's gated KL (Flow-GRPO: 0.04).")
    ap.add_argument("--reference-kl-threshold", type=float, default=1e-2,
                    help="GARDO resets its reference after a step whose KL passed this (code: 3e-4, set per task; the toy world drifts ~1e-3 per round).")
    ap.add_argument("--reset-every", type=int, default=15)
    ap.add_argument("--proxy-steps", type=int, default=0, help="Contrastive steps of the optimised proxy (0: the default 700-step proxy).")
    ap.add_argument("--ink-weight", type=float, default=0.0, help="Optimise toy_proxy_clip + W * toy_ink (a hackable proxy); 0: the CLIP alone.")
    ap.add_argument("--aux", nargs="+", default=["clip", "jpeg"], choices=["clip", "jpeg"],
                    help="GARDO's auxiliary rewards: the seed-1 proxy CLIP and/or jpeg_compressibility.")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--diversity-features", default="toy_strokes", choices=["toy_strokes", "toy_oracle"],
                    help="Features of the held-out diversity: the unit-length stroke mask (default; blobs read as alike) or "
                    "the whole oracle read-out (stroke mask with ink amount, and class probabilities, which scatter on unreadable images).")
    ap.add_argument("--gardo-set", nargs="*", default=[], help="key=value overrides of every GARDO arm "
                    "(e.g. diversity_advantage=false).")
    ap.add_argument("--report-only", action="store_true", help="Skip training; tabulate the runs already under --out "
                    "(e.g. after training arms and seeds as parallel processes).")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proxy = proxy_folder(args.proxy_steps, 0)
    needs_aux = any(a.startswith("gardo") for a in args.arms) and not args.report_only
    aux_proxy = proxy_folder(args.proxy_steps, 1) if needs_aux else None
    features = load_features(args.diversity_features)
    curves: Dict[str, List[List[Dict]]] = {arm: [] for arm in args.arms}
    rows, total = [], 0.0
    for seed in args.seeds:
        runs, seconds = {}, {}
        for arm in args.arms:
            folder = out / f"seed{seed}"
            if not args.report_only:
                t = time.time()
                genft.Trainer(arm_config(arm, args, seed, proxy, aux_proxy, folder)).train()
                (folder / arm / "seconds.json").write_text(json.dumps({"seconds": time.time() - t}))
            seconds[arm] = json.loads((folder / arm / "seconds.json").read_text())["seconds"]
            runs[arm] = eval_points(folder / arm, features, args.ink_weight)
            curves[arm].append(runs[arm])
            print(f"seed {seed} {arm}: {seconds[arm]:.0f} s; " + ", ".join(
                f"r{p['round']} proxy {p['proxy']:.3f} ink {p['ink']:.3f} acc {p['oracle_accuracy']:.3f} div {p['diversity']:.3f}"
                for p in runs[arm]), flush=True)
        level = min(max(p["proxy"] for p in pts) for pts in runs.values())
        rows += [summarise(arm, seed, runs[arm], level, seconds[arm]) for arm in args.arms]
        total += sum(seconds.values())

    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", "seed", "round", "proxy", "clip", "ink", "oracle_accuracy", "diversity"])
        w.writeheader()
        for arm, per_seed in curves.items():
            for seed, pts in zip(args.seeds, per_seed):
                for p in pts:
                    w.writerow({"arm": arm, "seed": seed, **p})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = report(rows, args, total)
    fit = diversity_beyond_ink(curves)
    lines[-1:-1] = ["", f"Diversity against ink over every evaluation: diversity ≈ {fit['intercept']:.3f} {fit['slope']:+.3f}·ink, "
                    f"r = {fit['r']:.2f}. Mean residual per arm (diversity beyond what the ink predicts; mean ± sd over seeds): "
                    + "; ".join(f"{LABELS[arm]} {_mean_sd(res)}" for arm, res in fit["residuals"].items()), ""]
    bins = by_proxy_bins(curves)
    if bins:
        table = ["Equal proxy over the whole curves: every evaluation after round 0, pooled over seeds into proxy bins "
                 "(evaluations n; oracle accuracy / diversity):", "",
                 "| proxy | " + " | ".join(LABELS[arm] for arm in args.arms) + " |", "|---|" + "---|" * len(args.arms)]
        for b in bins:
            cells = [f"n={c['n']}: {c['oracle_accuracy']:.3f} / {c['diversity']:.3f}" if (c := b["arms"].get(arm)) else ""
                     for arm in args.arms]
            table.append(f"| [{b['low']:.2f}, {b['high']:.2f}) | " + " | ".join(cells) + " |")
        lines[-1:-1] = table + [""]
    plotted = plot({arm: mean_curve(runs) for arm, runs in curves.items()}, out / "curves.png")
    lines.insert(2, "curves.png: " + ("the mean over seeds of proxy, ink, oracle accuracy and diversity over rounds, and "
                                     "accuracy and diversity against proxy" if plotted else "not drawn (matplotlib is not installed)"))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
