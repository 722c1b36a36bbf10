"""Diff-Instruct* on the toy world: the multistep base vs the one-step generator before and after DI*, from one run.

    OMP_NUM_THREADS=1 python scripts/bench/diff_instruct_star.py [--rounds 40] [--out genft_runs/bench_di_star]

- base: the toy diffusion base, DDIM 20 steps, η = 1, guidance 3 (the pretraining evaluation sampler).
- one-step init: the base's UNet read once at t* = 900 (`model: toyworld-one-step`), no guidance.
- one-step DI*: that generator after `--rounds` generator steps of the recipe
  scripts/recipes/diff_instruct_star_toyworld.yaml (reward: the differentiable proxy CLIPScore).
All three are sampled on every held-out prompt with the same fixed seeds (the Trainer's evaluation
seeds) and scored by the oracle (toy_oracle: soft prompt alignment; toy_oracle_accuracy: all three
attributes right) and the proxy. The issue's bar: one-step DI* held-out toy_oracle above the base's,
accuracy within 0.1 of the base's. Prints the table, writes summary.json; exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import genft  # noqa: E402
import reward_models  # noqa: E402
from genft.evaluation import evaluate_pipeline  # noqa: E402
from genft.prompts import load_prompts  # noqa: E402
from genft.toyworld import load_or_pretrain  # noqa: E402
from pipelines import DiffusionPipeline  # noqa: E402

RECIPE = ROOT / "scripts" / "recipes" / "diff_instruct_star_toyworld.yaml"
BASE_SAMPLER = dict(num_inference_steps=20, eta=1.0, guidance_scale=3.0)


def timed_eval(pipe, prompts, rewards, images_per_prompt: int, seed: int, **sampling):
    """evaluate_pipeline plus its wall time per image."""
    t0 = time.perf_counter()
    out = evaluate_pipeline(pipe, prompts, rewards, images_per_prompt=images_per_prompt, seed=seed, **sampling)
    n = len(prompts) * images_per_prompt
    return {k: v["mean"] for k, v in out["metrics"].items()}, (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="DI* generator steps (default: the recipe's num_rounds)")
    p.add_argument("--out", default="genft_runs/bench_di_star")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    overrides = [f"output_dir={args.out}", "progress=false", *args.overrides]
    if args.rounds is not None:
        overrides.append(f"num_rounds={args.rounds}")
    config = genft.load_config(RECIPE, overrides)
    prompts = load_prompts(config.eval_prompts, "eval_prompts")
    seed = config.seed + 12345  # the Trainer's evaluation seeds: image-for-image comparable
    names = [config.reward, *config.eval_rewards]
    rewards = {n: reward_models.load(n) for n in names}

    base = DiffusionPipeline.from_pretrained(load_or_pretrain(progress=False))
    base_metrics, base_spi = timed_eval(base, prompts, rewards, config.eval_images_per_prompt, seed, **BASE_SAMPLER)
    del base

    t0 = time.perf_counter()
    trainer = genft.Trainer(config)
    result = trainer.train()
    train_s = time.perf_counter() - t0
    one_step = dict(num_inference_steps=1, eta=0.0, guidance_scale=1.0)
    after_metrics, after_spi = timed_eval(trainer.pipeline, prompts, rewards, config.eval_images_per_prompt, seed, **one_step)
    init_metrics = {k: v["mean"] for k, v in result["before"]["metrics"].items()}

    rows = [("base DDIM-20, eta=1, CFG 3", 20, base_metrics, base_spi),
            ("one-step init (t*=900)", 1, init_metrics, None),
            (f"one-step DI* ({config.num_rounds} steps)", 1, after_metrics, after_spi)]
    print(f"held-out prompts: {len(prompts)} x {config.eval_images_per_prompt} images, fixed seeds; "
          f"DI* reward={config.reward} alpha_rev={config.reward_weight} ref CFG={config.reference_guidance_scale}")
    print(f"{'model':34s} {'NFE':>4s} {'toy_oracle':>10s} {'accuracy':>9s} {'proxy':>7s} {'s/image':>8s}")
    for name, nfe, m, spi in rows:
        nfe_eff = nfe * (2 if name.startswith("base") else 1)  # CFG doubles the base's UNet calls
        print(f"{name:34s} {nfe_eff:4d} {m['toy_oracle']:10.4f} {m['toy_oracle_accuracy']:9.4f} {m[config.reward]:7.3f} "
              f"{'' if spi is None else f'{spi:8.4f}'}")
    beats = after_metrics["toy_oracle"] > base_metrics["toy_oracle"]
    close = abs(after_metrics["toy_oracle_accuracy"] - base_metrics["toy_oracle_accuracy"]) <= 0.1
    wall = time.perf_counter() - t_start
    print(f"one-step DI* toy_oracle > base: {beats}; accuracy within 0.1 of base: {close}")
    print(f"DI* training {train_s:.0f} s (incl. its before/after evaluations); total wall {wall:.0f} s; threads={args.threads}")
    summary = {"base": base_metrics, "one_step_init": init_metrics, "one_step_di_star": after_metrics,
               "seconds_per_image": {"base": base_spi, "one_step_di_star": after_spi}, "train_seconds": train_s,
               "wall_seconds": wall, "beats_base": beats, "accuracy_within_0.1": close, "config": config.to_dict()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
