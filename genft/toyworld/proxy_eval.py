"""Does the proxy CLIP agree with the oracle? Spearman correlation on held-out toy samples.

Run `python -m genft.toyworld.proxy_eval` (it loads or builds the cached toy world and proxy). The
samples pair every held-out prompt with images of varied quality: base-generator samples under
several settings (guidance scales, few steps, and unconditional samples scored against the prompt)
plus clean renders of the prompt's own combination and of deliberately mismatched combinations.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import COLORS, DIGITS, Combo, heldout_combos, heldout_prompts, parse_prompt

# name -> (guidance_scale, num_inference_steps, conditional). Unconditional samples ('' prompt) are
# scored against the held-out prompt, so they are mostly wrong: the low end of the oracle score.
DEFAULT_SETTINGS: dict[str, tuple[float, int, bool]] = {
    "cfg1": (1.0, 20, True),
    "cfg3": (3.0, 20, True),
    "cfg7.5": (7.5, 20, True),
    "cfg3_4steps": (3.0, 4, True),
    "uncond": (1.0, 20, False),
}


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-d tensor, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    if x.ndim != 1:
        raise ValueError(f"rankdata takes a 1-d tensor, got shape {tuple(x.shape)}")
    values, inverse, counts = torch.unique(x.double(), sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # rank of the last member of each tie group
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks; nan when either input is constant."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs inputs of equal length, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise ValueError(f"spearman needs at least 2 pairs, got {x.numel()}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float("nan") if denom == 0 else float((rx * ry).sum() / denom)


@dataclass
class ProxyEvalConfig:
    """What `evaluate_proxy` samples; the defaults make 30 held-out prompts x (5 x 4 generated + 2 x 4 clean) = 840 pairs."""

    images_per_prompt: int = field(default=4, metadata={"help": "Generated samples per held-out prompt and setting."})
    settings: dict = field(default_factory=lambda: dict(DEFAULT_SETTINGS), metadata={
        "help": "Sampler settings: name -> (guidance_scale, num_inference_steps, conditional)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta of the sampler (1 is the stochastic rollout sampler)."})
    clean_per_prompt: int = field(default=4, metadata={"help": "Clean renders per held-out prompt of its own combination, and as many of mismatched ones."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler noise and of the clean renders."})
    batch_size: int = field(default=120, metadata={"help": "Prompts sampled at once."})

    def __post_init__(self):
        for name in ("images_per_prompt", "clean_per_prompt", "batch_size"):
            if getattr(self, name) < (1 if name == "batch_size" else 0):
                raise ValueError(f"ProxyEvalConfig.{name} is out of range: {getattr(self, name)}")
        for name, setting in self.settings.items():
            if len(setting) != 3 or setting[0] < 0 or int(setting[1]) < 1:
                raise ValueError(f"ProxyEvalConfig.settings[{name!r}] must be (guidance_scale >= 0, steps >= 1, conditional), got {setting}")


def mismatched_combo(combo: Combo, generator: torch.Generator) -> Combo:
    """A different valid combination: 1, 2 or 3 of (digit, fg, bg) changed at random."""
    while True:
        n_changed = int(torch.randint(1, 4, (1,), generator=generator))
        fields = torch.randperm(3, generator=generator)[:n_changed].tolist()
        digit, fg, bg = combo
        if 0 in fields:
            digit = [d for d in DIGITS if d != combo.digit][int(torch.randint(9, (1,), generator=generator))]
        if 1 in fields:
            fg = [c for c in COLORS if c != combo.fg][int(torch.randint(len(COLORS) - 1, (1,), generator=generator))]
        if 2 in fields:
            bg = [c for c in COLORS if c != combo.bg][int(torch.randint(len(COLORS) - 1, (1,), generator=generator))]
        if fg != bg:
            return Combo(digit, fg, bg)


@torch.no_grad()
def make_samples(pipe, config: ProxyEvalConfig, progress: bool = True) -> tuple[torch.Tensor, list[str], list[str]]:
    """Images [N,3,16,16], the held-out prompt each is scored against, and each one's source (setting or clean_*)."""
    from tqdm.auto import tqdm

    from .proxy import digit_split, render_from

    prompts = heldout_prompts()
    images, scored, source = [], [], []
    bar = tqdm(total=len(config.settings), desc="proxy eval: sampling", disable=not progress, dynamic_ncols=True)
    for name, (guidance, steps, conditional) in config.settings.items():
        flat = [p for p in prompts for _ in range(config.images_per_prompt)]
        for start in range(0, len(flat), config.batch_size):
            chunk = flat[start:start + config.batch_size]
            gens = [torch.Generator().manual_seed(config.seed * 1_000_003 + start + i) for i in range(len(chunk))]
            fed = chunk if conditional else [""] * len(chunk)
            images.append(pipe.sample(fed, generator=gens, num_inference_steps=int(steps), guidance_scale=float(guidance), eta=config.eta).cpu())
        scored += flat
        source += [name] * len(flat)
        bar.update(1)
    bar.close()
    if config.clean_per_prompt:
        gen = torch.Generator().manual_seed(config.seed + 7)
        _, held_digits = digit_split()
        own = [c for c in heldout_combos() for _ in range(config.clean_per_prompt)]
        other = [mismatched_combo(c, gen) for c in own]
        flat = [p for p in prompts for _ in range(config.clean_per_prompt)]
        for kind, combos in (("clean_match", own), ("clean_mismatch", other)):
            images.append(render_from(combos, held_digits, gen, augment=True))
            scored += flat
            source += [kind] * len(flat)
    return torch.cat(images), scored, source


def _summary(proxy: torch.Tensor, cosine: torch.Tensor, soft: torch.Tensor, acc: torch.Tensor) -> dict:
    """n, means, and Spearman correlations of the proxy (CLIPScore and raw cosine) with the oracle's soft score and 0/1 accuracy."""
    out = {"n": int(proxy.numel()), "proxy_mean": round(proxy.mean().item(), 4), "oracle_mean": round(soft.mean().item(), 4),
           "accuracy": round(acc.mean().item(), 4)}
    if proxy.numel() >= 2:  # None where a side is constant (e.g. accuracy of the clean subsets)
        for key, (a, b) in {"spearman_proxy_oracle": (proxy, soft), "spearman_cosine_oracle": (cosine, soft),
                            "spearman_proxy_accuracy": (proxy, acc)}.items():
            rho = spearman(a, b)
            out[key] = None if math.isnan(rho) else round(rho, 4)
    return out


def evaluate_proxy(world_dir: str | Path | None = None, proxy_dir: str | Path | None = None,
                   config: ProxyEvalConfig | None = None, progress: bool = True) -> dict:
    """Score held-out samples with the proxy (ToyProxyCLIPScore) and the oracle; return correlations overall and per source."""
    from pipelines import DiffusionPipeline

    from .accuracy import ToyOracleAccuracy
    from .cache import load_or_pretrain
    from .oracle import OracleEvaluator, ToyOracleReward
    from .proxy import ToyProxyCLIPScore, load_or_train_proxy

    config = config or ProxyEvalConfig()
    t0 = time.perf_counter()
    world = load_or_pretrain(world_dir, progress=progress)
    proxy_path = load_or_train_proxy(proxy_dir, progress=progress)
    pipe = DiffusionPipeline.from_pretrained(world)
    images, prompts, source = make_samples(pipe, config, progress)
    for p in prompts:
        parse_prompt(p)  # every scored prompt must be a toy caption
    oracle = OracleEvaluator()
    proxy = ToyProxyCLIPScore(proxy_path)(images, prompts)
    cosine = ToyProxyCLIPScore(proxy_path, mode="cosine")(images, prompts)
    soft = ToyOracleReward(oracle)(images, prompts)
    acc = ToyOracleAccuracy(oracle)(images, prompts)
    src = list(source)
    generated = torch.tensor([not s.startswith("clean_") for s in src])
    result = {
        "world": str(world), "proxy": str(proxy_path), "config": asdict(config),
        "all": _summary(proxy, cosine, soft, acc),
        "generated": _summary(proxy[generated], cosine[generated], soft[generated], acc[generated]),
        "by_source": {},
    }
    for name in dict.fromkeys(src):
        m = torch.tensor([s == name for s in src])
        result["by_source"][name] = _summary(proxy[m], cosine[m], soft[m], acc[m])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _fmt(rho: float | None) -> str:
    """A correlation for the table ('-' when undefined)."""
    return "-" if rho is None else f"{rho:.3f}"


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: print the evaluation as JSON (and a short table)."""
    parser = argparse.ArgumentParser(description="Spearman correlation of the toy proxy CLIP with the oracle on held-out samples")
    parser.add_argument("--world", default=None, help="toy world folder (default: the cached one, built if absent)")
    parser.add_argument("--proxy", default=None, help="proxy CLIP folder (default: the cached one, trained if absent)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--clean-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the result to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = ProxyEvalConfig(images_per_prompt=args.images_per_prompt, clean_per_prompt=args.clean_per_prompt, seed=args.seed)
    result = evaluate_proxy(args.world, args.proxy, config, progress=not args.no_progress)
    print(json.dumps(result, indent=1))
    print(f"{'subset':<16}{'n':>5}{'proxy':>8}{'oracle':>8}{'acc':>7}{'rho(proxy,oracle)':>19}{'rho(proxy,acc)':>16}")
    rows = [("all", result["all"]), ("generated", result["generated"]), *result["by_source"].items()]
    for name, r in rows:
        print(f"{name:<16}{r['n']:>5}{r['proxy_mean']:>8.3f}{r['oracle_mean']:>8.3f}{r['accuracy']:>7.3f}"
              f"{_fmt(r.get('spearman_proxy_oracle')):>19}{_fmt(r.get('spearman_proxy_accuracy')):>16}")
    if args.out:
        from genft._atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
