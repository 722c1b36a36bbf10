"""Reward hacking on the toy world: GRPO (β=0), GRPO with a fixed KL, and GARDO, on one proxy reward and one budget.

    OMP_NUM_THREADS=1 python scripts/gardo_toyworld.py --out genft_runs/gardo_toyworld

Every arm optimises `toy_proxy_clip`, the toy world's learned CLIP proxy (`--proxy-steps N` swaps in a
weaker proxy: the same recipe stopped after N contrastive steps). Held out and never used in training:
`toy_oracle_accuracy` (does the image show the prompt's digit and colours, per the fixed oracle) and a
diversity measure (mean pairwise distance between a prompt's images in the oracle's fixed read-out
features, `genft.metrics.diversity_within_prompt`), both on fixed-seed samples of held-out prompts every
`--eval-every` rounds.

GARDO's auxiliary rewards are a second proxy CLIP trained with another seed (an independent estimate of
the same objective, so rank disagreement is epistemic uncertainty) and `jpeg_compressibility` (a generic
image prior: noisy, artefact-laden images compress badly). Its diversity features come from the proxy
CLIP's image tower, never from the oracle. Writes summary.md, summary.csv, curves.csv and curves.png
under --out. The arms can also be trained as parallel processes (one `--arms X` each, same --out) and
tabulated with `--report-only`.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Dict, List

import torch

import genft
from genft.config import parse_overrides
from genft.features import ToyOracleFeatures, load_images
from genft.metrics import diversity_within_prompt
from genft.toyworld.proxy import ProxyConfig, load_or_train_proxy

ARMS = ("baseline", "kl", "gardo")
LABELS = {"baseline": "GRPO, no KL (β=0)", "kl": "GRPO, fixed KL", "gardo": "GARDO (GRPO)"}


def proxy_folder(steps: int, seed: int) -> Path:
    """The toy proxy recipe with `steps` steps (0: 700) and `seed`, cached beside the toy world; (0, 0) is the default proxy."""
    if steps == 0 and seed == 0:
        return load_or_train_proxy(progress=False)
    steps = steps or ProxyConfig().steps
    folder = Path.home() / ".cache" / "genft" / f"toyworld-v2-proxy-s{steps}-seed{seed}"
    return load_or_train_proxy(folder, progress=False, config=ProxyConfig(steps=steps, seed=seed))


def arm_config(arm: str, args, proxy: Path, aux_proxy: Path, out: Path):
    """The training config of one arm; everything but the regulariser is shared."""
    common = dict(
        model="toyworld", reward="toy_proxy_clip", reward_options={"toy_proxy_clip": {"path": str(proxy)}},
        eval_rewards=["toy_oracle_accuracy"], prompts="toyworld:train", eval_prompts="toyworld:heldout",
        output_dir=str(out / arm), seed=args.seed, num_inference_steps=args.steps, guidance_scale=1.0, eta=1.0,
        num_rounds=args.rounds, prompts_per_round=8, samples_per_prompt=4, train_batch_size=16, gradient_accumulation=1,
        learning_rate=args.lr, clip_range=args.clip_range, timestep_fraction=args.timestep_fraction, inner_epochs=args.inner_epochs,
        eval_every=args.eval_every, eval_max_prompts=args.eval_prompts, eval_images_per_prompt=args.images_per_prompt, progress=False,
    )
    if arm == "baseline":
        return genft.load_config(method="grpo", kl_weight=0.0, **common)
    if arm == "kl":
        return genft.load_config(method="grpo", kl_weight=args.kl_weight, **common)
    aux = "genft.toyworld.proxy:ToyProxyCLIPScore"
    gardo = dict(
        method="gardo_grpo", kl_weight=args.kl_weight, aux_rewards=[aux, "jpeg_compressibility"],
        aux_reward_options={aux: {"path": str(aux_proxy)}}, reference_kl_threshold=args.reference_kl_threshold,
        reference_reset_every=args.reset_every, diversity_features="toy_proxy_clip", diversity_std=True)
    return genft.load_config(**{**common, **gardo, **parse_overrides(args.gardo_set)})


def eval_points(run_dir: Path, features) -> List[Dict]:
    """Proxy, oracle accuracy and diversity of every saved evaluation of a run, in round order."""
    rows = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "eval":
            continue
        folder = run_dir / "evals" / rec["tag"]
        samples = json.loads((folder / "samples.json").read_text())["samples"]
        images = load_images([folder / s["file"] for s in samples], (16, 16))
        div = diversity_within_prompt(features(images), [s["prompt"] for s in samples])["mean"]
        rows.append({"round": rec["round"], "proxy": rec["eval/toy_proxy_clip"],
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


def plot(curves: Dict[str, List[Dict]], path: Path) -> bool:
    """Proxy, oracle accuracy and diversity over rounds, and the two held-out measures against proxy; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for arm, pts in curves.items():
        r = [p["round"] for p in pts]
        for ax, key in zip(axes[:3], ("proxy", "oracle_accuracy", "diversity")):
            ax.plot(r, [p[key] for p in pts], marker="o", label=LABELS[arm])
        for ax, key in zip(axes[3:], ("oracle_accuracy", "diversity")):
            ax.plot([p["proxy"] for p in pts], [p[key] for p in pts], marker="o", label=LABELS[arm])
    titles = ("proxy reward (optimised)", "oracle accuracy (held out)", "diversity (held out)", "oracle accuracy vs proxy",
              "diversity vs proxy")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("proxy reward" if "vs" in title else "round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="genft_runs/gardo_toyworld")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--rounds", type=int, default=30)
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
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gardo-set", nargs="*", default=[], help="key=value overrides of the GARDO arm, for ablations "
                    "(e.g. uncertainty_sign=reference_code diversity_advantage=false).")
    ap.add_argument("--report-only", action="store_true", help="Skip training; tabulate the runs already under --out "
                    "(e.g. after training the arms as parallel processes, one --arms each).")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proxy = proxy_folder(args.proxy_steps, 0)
    aux_proxy = proxy_folder(args.proxy_steps, 1) if "gardo" in args.arms and not args.report_only else None
    features = ToyOracleFeatures()
    curves, seconds = {}, {}
    for arm in args.arms:
        if not args.report_only:
            t = time.time()
            genft.Trainer(arm_config(arm, args, proxy, aux_proxy, out)).train()
            (out / arm / "seconds.json").write_text(json.dumps({"seconds": time.time() - t}))
        seconds[arm] = json.loads((out / arm / "seconds.json").read_text())["seconds"]
        curves[arm] = eval_points(out / arm, features)
        print(f"{arm}: {seconds[arm]:.0f} s; " + ", ".join(f"r{p['round']} proxy {p['proxy']:.3f} acc {p['oracle_accuracy']:.3f} "
                                                          f"div {p['diversity']:.3f}" for p in curves[arm]), flush=True)

    level = min(max(p["proxy"] for p in pts) for pts in curves.values())
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", "round", "proxy", "oracle_accuracy", "diversity"])
        w.writeheader()
        for arm, pts in curves.items():
            for p in pts:
                w.writerow({"arm": arm, **p})
    rows = []
    for arm, pts in curves.items():
        first, last, matched = pts[0], pts[-1], at_proxy_level(pts, level)
        rows.append({"arm": arm, "method": LABELS[arm], "seconds": round(seconds[arm]),
                     "proxy_before": first["proxy"], "proxy_final": last["proxy"], "proxy_max": max(p["proxy"] for p in pts),
                     "oracle_acc_before": first["oracle_accuracy"], "oracle_acc_final": last["oracle_accuracy"],
                     "diversity_before": first["diversity"], "diversity_final": last["diversity"],
                     "matched_proxy": level, "matched_round": matched["round"], "oracle_acc_at_matched": matched["oracle_accuracy"],
                     "diversity_at_matched": matched["diversity"]})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Reward hacking on the toy world ({args.rounds} rounds × 32 samples, lr {args.lr}, proxy {args.proxy_steps} steps)", "",
             f"Matched proxy level: {level:.3f} (the highest eval proxy every arm reaches).", "",
             "| method | proxy before → final (max) | oracle acc before → final | diversity before → final | "
             "round at matched proxy | oracle acc at matched | diversity at matched | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['proxy_before']:.3f} → {r['proxy_final']:.3f} ({r['proxy_max']:.3f}) | "
                     f"{r['oracle_acc_before']:.3f} → {r['oracle_acc_final']:.3f} | {r['diversity_before']:.3f} → {r['diversity_final']:.3f} | "
                     f"{r['matched_round']:.1f} | {r['oracle_acc_at_matched']:.3f} | {r['diversity_at_matched']:.3f} | {r['seconds']} |")
    plotted = plot(curves, out / "curves.png")
    lines += ["", "curves.png: " + ("proxy, oracle accuracy and diversity over rounds" if plotted else "not drawn (matplotlib is not installed)"),
              f"Training time {sum(seconds.values()):.0f} s over the arms (wall {time.time() - t0:.0f} s for this call). Settings: {json.dumps(vars(args))}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
