"""Fixed-seed sample evaluation: images per prompt, every reward's mean ± std, saved for the gallery.

The saved folder (images/NNNN.png, grid.png, samples.json, metrics.json) is what `genft eval` and the
gallery read back; set metrics (diversity, Fréchet distance) are computed from those PNGs in genft.eval_cli.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from reward_models import RewardError

from ._atomic import atomic_dir


def sample_grid(images: torch.Tensor, rows: int, min_cell_px: int = 64, pad: int = 2) -> Image.Image:
    """A PNG-ready grid: `rows` rows (one per prompt) of images [N,3,H,W] in [0,1]; small images upscaled (nearest)."""
    n, _, h, w = images.shape
    if rows < 1 or n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows evenly")
    cols = n // rows
    scale = max(1, -(-min_cell_px // max(h, w)))
    x = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    ch, cw = h * scale, w * scale
    canvas = torch.ones(3, rows * (ch + pad) + pad, cols * (cw + pad) + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (ch + pad), pad + c * (cw + pad)
        canvas[:, top:top + ch, left:left + cw] = x[i]
    return Image.fromarray((canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def eval_seeds(num_prompts: int, images_per_prompt: int, seed: int) -> List[int]:
    """One seed per (prompt, image) pair, independent of batch size, so runs compare image for image."""
    return [seed * 1_000_003 + i for i in range(num_prompts * images_per_prompt)]


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    prompts: Sequence[str],
    rewards: Dict[str, torch.nn.Module],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    batch_size: int = 64,
    out_dir: Optional[Path] = None,
    progress: bool = False,
) -> Dict:
    """Sample every prompt `images_per_prompt` times with fixed seeds and score them with each reward.

    Returns {"metrics": {reward: {"mean", "std"}}, "samples": [{prompt, seed, scores, file}]}; with
    `out_dir`, writes images/NNNN.png, grid.png (a row per prompt), samples.json and metrics.json there atomically.
    """
    flat_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = eval_seeds(len(prompts), images_per_prompt, seed)
    images, scores = [], {name: [] for name in rewards}
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(flat_prompts), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = flat_prompts[start:start + batch_size]
        gens = [torch.Generator(device=pipeline.device).manual_seed(s) for s in seeds[start:start + batch_size]]
        imgs = pipeline.sample(chunk, generator=gens, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, eta=eta)
        images.append(imgs.cpu())
        for name, reward in rewards.items():
            try:
                scores[name].append(reward(imgs, chunk).cpu())
            except Exception as e:
                shown = chunk[:4] + (["..."] if len(chunk) > 4 else [])
                raise RewardError(f"reward {name!r} failed on evaluation prompts {shown}: {e}") from e
    all_images = torch.cat(images)
    all_scores = {k: torch.cat(v) for k, v in scores.items()}
    metrics = {k: {"mean": v.mean().item(), "std": v.std(unbiased=False).item()} for k, v in all_scores.items()}
    samples = [
        {"prompt": p, "seed": s, "scores": {k: v[i].item() for k, v in all_scores.items()}, "file": f"images/{i:04d}.png"}
        for i, (p, s) in enumerate(zip(flat_prompts, seeds))
    ]
    result = {"metrics": metrics, "samples": samples, "images_per_prompt": images_per_prompt,
              "sampling": {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta}}
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            (tmp / "images").mkdir()
            arr = (all_images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for i, a in enumerate(arr):
                Image.fromarray(a).save(tmp / f"images/{i:04d}.png")
            sample_grid(all_images, rows=len(prompts)).save(tmp / "grid.png")
            (tmp / "samples.json").write_text(json.dumps(result, indent=1))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return result
