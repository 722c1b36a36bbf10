"""FAIL-PD and FAIL-PG on the toy flow base toward a held-out digit style; prints a fixed-feature Fréchet distance before and after.

    OMP_NUM_THREADS=2 python scripts/fail_toyworld.py --style thin --out genft_runs/fail_toyworld

Features are the toy oracle's read-out (digit / colour probabilities and the 8x8 stroke mask,
`genft.features.ToyOracleFeatures`), fixed and never trained. The reference sets are real digits
rendered for the same prompts in the expert style and in the base's own (plain) style; oracle
accuracy shows whether the prompts are still followed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import torch

import genft
from genft.features import ToyOracleFeatures
from genft.methods._expert import render_style
from genft.metrics import frechet_distance_features
from genft.toyworld import OracleEvaluator, heldout_prompts, parse_prompt, render, train_prompts
from genft.toyworld.flow_pretrain import load_or_pretrain_flow, validate_flow_world
from pipelines import FlowMatchPipeline


def eval_prompts(n: int) -> List[str]:
    """n canonical training prompts, spread over the list (each sampled twice)."""
    pool = train_prompts()
    step = max(1, len(pool) // n)
    return [p for p in pool[::step][:n] for _ in range(2)]


@torch.no_grad()
def measure(pipe, prompts: List[str], refs: Dict[str, torch.Tensor], features, oracle, steps: int, guidance: float) -> Dict:
    """Fixed-seed ODE samples of `prompts`: Fréchet distance to each reference set, oracle accuracy, and the images."""
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
    images = pipe.sample(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance, noise_level=0.0)
    feats = features(images)
    out = {f"fd_to_{name}": frechet_distance_features(feats, ref) for name, ref in refs.items()}
    acc = oracle.evaluate(images, prompts)
    out.update({k: acc[k] for k in ("digit_acc", "fg_acc", "bg_acc", "all_acc")})
    out["images"] = images
    return out


def save_grid(rows: Dict[str, torch.Tensor], path: Path, n: int = 16, scale: int = 4) -> None:
    """One row of `n` images spread over each entry (16x16 pixels each, upscaled) as a PNG."""
    from PIL import Image

    pick = torch.linspace(0, len(next(iter(rows.values()))) - 1, n).round().long()  # spread over the digits
    grid = torch.cat([torch.cat(list(imgs[pick]), dim=2) for imgs in rows.values()], dim=1)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)


def run_variant(variant: str, flow_dir: Path, out: Path, args) -> Dict:
    """Fine-tune a fresh copy of the flow base with FAIL-`variant`; returns the trained pipeline and the run summary."""
    common = dict(method="fail", model=str(flow_dir), reward="toy_oracle", eval_rewards=["toy_oracle_accuracy"],
                  output_dir=str(out / variant), seed=args.seed, expert_data=f"toyworld:{args.style}", variant=variant,
                  num_rounds=args.rounds, prompts_per_round=args.prompts_per_round, samples_per_prompt=args.samples_per_prompt,
                  num_inference_steps=args.train_steps, guidance_scale=args.guidance, eval_max_prompts=6,
                  eval_images_per_prompt=2, progress=False, disc_steps=args.disc_steps, disc_batch_size=32,
                  disc_lr=args.disc_lr, disc_warmup_rounds=args.warmup_rounds, train_batch_size=16)
    if variant == "pd":
        common.update(learning_rate=args.pd_lr, pd_mode=args.pd_mode, pd_steps=args.pd_steps, kl_weight=args.kl_weight)
    else:
        common.update(learning_rate=args.pg_lr, kl_weight=args.kl_weight, clip_range=args.pg_clip, inner_epochs=2)
    config = genft.load_config(**common)
    pipe = FlowMatchPipeline.from_pretrained(flow_dir)
    t0 = time.time()
    genft.Trainer(config, pipeline=pipe, prompts=train_prompts(), eval_prompts=heldout_prompts()).train()
    return {"pipe": pipe, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", default="thin", choices=["bold", "thin", "italic"], help="Expert stroke style.")
    ap.add_argument("--variants", nargs="+", default=["pd", "pg"], choices=["pd", "pg"])
    ap.add_argument("--world", default=None, help="Toy world folder (default: load_or_pretrain()).")
    ap.add_argument("--flow-dir", default=None, help="Flow base folder (default: <world>-flow, trained if absent).")
    ap.add_argument("--out", default="genft_runs/fail_toyworld")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--prompts-per-round", type=int, default=8)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=10, help="Euler steps of training rollouts.")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--disc-steps", type=int, default=16, help="Discriminator updates per round.")
    ap.add_argument("--disc-lr", type=float, default=1e-3)
    ap.add_argument("--warmup-rounds", type=int, default=3, help="Rounds that train only the discriminator.")
    ap.add_argument("--pd-mode", default="one_step", choices=["one_step", "ode"])
    ap.add_argument("--pd-steps", type=int, default=10, help="Euler steps of the differentiable solve with --pd-mode ode.")
    ap.add_argument("--pd-lr", type=float, default=1e-4)
    ap.add_argument("--pg-lr", type=float, default=3e-4)
    ap.add_argument("--pg-clip", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=0.0)
    ap.add_argument("--eval-prompts", type=int, default=100, help="Distinct prompts in the measurement set (2 samples each).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    flow_dir = Path(load_or_pretrain_flow(args.flow_dir, args.world, progress=False))
    base_meta = validate_flow_world(flow_dir)["stats"]
    out = Path(args.out)
    prompts = eval_prompts(args.eval_prompts)
    combos = [parse_prompt(p) for p in prompts]
    features, oracle = ToyOracleFeatures(), OracleEvaluator()
    g = torch.Generator().manual_seed(args.seed + 1)
    expert_images = render_style(combos, args.style, g)
    refs = {"expert": features(expert_images), "plain": features(render(combos, generator=g))}
    floor = frechet_distance_features(refs["expert"], features(render_style(combos, args.style, g)))
    steps, guidance = args.eval_steps, args.guidance
    base = measure(FlowMatchPipeline.from_pretrained(flow_dir), prompts, refs, features, oracle, steps, guidance)
    results = {"style": args.style, "n_images": len(prompts), "expert_vs_expert_floor": floor, "base": base,
               "flow_base_heldout": base_meta.get("heldout"), "flow_base_train_seconds": base_meta.get("train_seconds")}
    for variant in args.variants:
        run = run_variant(variant, flow_dir, out, args)
        results[f"fail_{variant}"] = {**measure(run["pipe"], prompts, refs, features, oracle, steps, guidance), "seconds": run["seconds"]}
    out.mkdir(parents=True, exist_ok=True)
    rows = {name: results[name].pop("images") for name in ["base"] + [f"fail_{v}" for v in args.variants]}
    save_grid({**rows, "expert": expert_images}, out / "samples.png")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"samples (rows: {', '.join(rows)}, expert) in {out / 'samples.png'}")
    print(f"expert style {args.style!r}; Fréchet distance in toy-oracle features over {len(prompts)} images "
          f"(expert vs expert floor {floor:.3f})")
    print(f"{'model':<10}{'FD->expert':>12}{'FD->plain':>11}{'digit':>8}{'fg':>7}{'bg':>7}{'all':>7}{'sec':>7}")
    for name in ["base"] + [f"fail_{v}" for v in args.variants]:
        r = results[name]
        print(f"{name:<10}{r['fd_to_expert']:>12.3f}{r['fd_to_plain']:>11.3f}{r['digit_acc']:>8.3f}{r['fg_acc']:>7.3f}"
              f"{r['bg_acc']:>7.3f}{r['all_acc']:>7.3f}{r.get('seconds', 0):>7.0f}")


if __name__ == "__main__":
    main()
