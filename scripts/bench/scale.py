"""Cost curve: time and peak memory of one policy-gradient update as batch size and resolution grow.

    python scripts/bench/scale.py [--batches 1,2,4,8] [--sizes 16,32,64] [--steps 4] [--device cpu]

For each (resolution, batch) it times one DPOK-style update over T stored transitions (score every
step under the current weights, clipped loss, backward) on the SD-shaped model of overhead.py, and
reports seconds per update, seconds per sample, and the ratio to the smallest batch at that size
(1.0 per doubling = linear scaling). Peak memory is CUDA's max_memory_allocated on GPU, and the
process's peak RSS growth (resource.getrusage) on CPU. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import build  # noqa: E402

from genft.losses import clipped_policy_loss  # noqa: E402


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device={args.device} steps={args.steps} guidance={args.guidance} torch={torch.__version__}")
    print(f"{'size':>5} {'batch':>5} {'s/update':>9} {'s/sample':>9} {'x smallest':>10} {'peak MB':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        pipe, _ = build(size, args.device)
        base = None
        for b in batches:
            prompts = ["a red cat"] * b
            traj = pipe.rollout(prompts, generator=[torch.Generator(args.device).manual_seed(i) for i in range(b)],
                                num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def update():
                pipe.unet.zero_grad(set_to_none=True)
                for k in range(traj.num_steps):
                    step = pipe.score_transition(traj.latents[:, k], traj.latents[:, k + 1], traj.timesteps[k].repeat(b),
                                                 traj.prompt_embeds, traj.negative_prompt_embeds, args.guidance, 1.0, args.steps)
                    clipped_policy_loss(step.log_prob, traj.log_probs[:, k], torch.ones(b), 1e-4, "ppo").mean().backward()

            update()  # warm-up
            t0 = time.perf_counter()
            update()
            if args.device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            base = base or dt
            print(f"{size:>5} {b:>5} {dt:>9.3f} {dt / b:>9.4f} {dt / base:>10.2f} {peak_mb(args.device):>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
