"""`genft eval`: the base model and checkpoints on one prompt set with fixed seeds, into a gallery plus JSON/CSV metrics.

Every input (checkpoints, rewards, prompts, features, reference data, logs) is checked before a model is
loaded; checkpoints are verified against their manifest and read from safetensors only. Outputs in OUT:
gallery.html, metrics.json, metrics.csv, samples.json (per-image scores) and evals/<model>/ (images, grid.png).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError

KINDS = {"reward": "reward", "heldout": "held-out reward", "oracle": "oracle accuracy",
         "diversity": "diversity (within prompt)", "fd": "Fréchet distance to real data"}


@dataclass
class EvalPlan:
    """Everything `run_eval` needs, resolved and checked; nothing sampled yet."""

    out_dir: Path
    model: str
    models: List[Tuple[str, Optional[Path]]]  # (label, checkpoint or None for the base model)
    prompts: List[str]
    rewards: Dict[str, Any]
    kinds: Dict[str, str]
    features: Any = None
    reference: Optional[str] = None  # 'toyworld', an image folder, or None
    logs: List[Tuple[str, Path]] = field(default_factory=list)
    sampling: Dict[str, Any] = field(default_factory=dict)
    toy: bool = False  # the toy world (by name or a pretrained world folder): oracle accuracy per attribute
    load_options: Dict[str, Any] = field(default_factory=dict)  # resolution / max_sequence_length the run trained at


def _ckpt_config(path: Path) -> Dict[str, Any]:
    from .checkpoint import read_trainer_state

    return read_trainer_state(path).get("config", {}) or {}


def _label(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def _slug(label: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def _check_checkpoint(path: Path) -> None:
    from .checkpoint import verify_checkpoint

    if not path.is_dir():
        raise ConfigError(f"--checkpoints {str(path)!r} is not a folder; give checkpoint folders such as RUN/checkpoints/final")
    if not (path / "unet").is_dir() or not any((path / "unet").glob("*.safetensors")):
        raise ConfigError(f"--checkpoints {str(path)!r} has no unet/*.safetensors; only safetensors checkpoints are loaded")
    try:
        verify_checkpoint(path)
    except ValueError as e:
        raise ConfigError(f"--checkpoints: {e}") from e


def plan_eval(
    out_dir: str,
    checkpoints: Sequence[str] = (),
    model: Optional[str] = None,
    prompts: str = "toyworld:heldout",
    rewards: Optional[Sequence[str]] = None,
    heldout_rewards: Optional[Sequence[str]] = None,
    reward_options: Optional[Dict[str, Dict[str, Any]]] = None,
    labels: Optional[Sequence[str]] = None,
    include_base: bool = True,
    max_prompts: int = 0,
    features: Optional[str] = None,
    feature_options: Optional[Dict[str, Any]] = None,
    reference: Optional[str] = None,
    logs: Optional[Sequence[str]] = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    batch_size: int = 64,
) -> EvalPlan:
    """Resolve and check every input, cheapest first; errors name the command-line argument at fault."""
    from .features import image_files, load_features
    from .prompts import load_prompts
    from .reward_setup import build_eval_rewards

    for name, value, low in (("--images-per-prompt", images_per_prompt, 1), ("--steps", num_inference_steps, 1),
                             ("--batch-size", batch_size, 1), ("--max-prompts", max_prompts, 0)):
        if value < low:
            raise ConfigError(f"{name}={value} must be >= {low}")
    if guidance_scale < 1 or eta < 0:
        raise ConfigError(f"--guidance-scale={guidance_scale} must be >= 1 and --eta={eta} >= 0")
    ckpts = [Path(c) for c in checkpoints]
    for c in ckpts:
        _check_checkpoint(c)
    if not ckpts and not include_base:
        raise ConfigError("nothing to evaluate: --no-base needs at least one --checkpoints folder")
    train_cfg = _ckpt_config(ckpts[0]) if ckpts else {}
    model = model or train_cfg.get("model")
    if not model:
        raise ConfigError("--model is required (e.g. --model toyworld, a hub id or a diffusers folder); "
                          "it could not be read from the checkpoints")
    toy = model == "toyworld" or (Path(model) / "genft_toyworld.json").is_file()

    models: List[Tuple[str, Optional[Path]]] = ([("base", None)] if include_base else []) + [(_label(c), c) for c in ckpts]
    if labels:
        if len(labels) != len(models):
            raise ConfigError(f"--labels gives {len(labels)} names for {len(models)} models ({'base + ' if include_base else ''}"
                              f"{len(ckpts)} checkpoints)")
        models = [(lab, c) for lab, (_, c) in zip(labels, models)]
    seen: Dict[str, int] = {}
    for i, (lab, c) in enumerate(models):  # make labels unique: they are column names
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            models[i] = (f"{lab} #{seen[lab]}", c)

    prompt_list = load_prompts(prompts, "--prompts")
    if max_prompts:
        prompt_list = prompt_list[:max_prompts]
    if rewards is None:
        if train_cfg.get("reward"):
            r = train_cfg["reward"]
            rewards = list(r) if isinstance(r, dict) else [r]
            heldout_rewards = heldout_rewards if heldout_rewards is not None else list(train_cfg.get("eval_rewards", []))
            reward_options = reward_options if reward_options is not None else train_cfg.get("reward_options")
        elif toy:
            rewards = ["toy_oracle"]
        else:
            raise ConfigError("--rewards is required: name the rewards to measure (see reward_models.available())")
    if heldout_rewards is None:
        heldout_rewards = [n for n in ["toy_oracle_accuracy"] if toy and n not in rewards]
    both = sorted(set(rewards) & set(heldout_rewards))
    if both:
        raise ConfigError(f"{both} appear in both --rewards and --heldout-rewards; list each reward once")
    if not rewards and not heldout_rewards:
        raise ConfigError("--rewards is empty; name at least one reward")
    options = dict(reward_options or {})
    stray = sorted(set(options) - set(rewards) - set(heldout_rewards))
    if stray:
        raise ConfigError(f"--reward-options names {stray}, which are not in --rewards/--heldout-rewards")
    built: Dict[str, Any] = {}
    for arg, names in (("--rewards", rewards), ("--heldout-rewards", heldout_rewards)):
        try:
            built.update(build_eval_rewards(list(names), {n: options.get(n, {}) for n in names}))
        except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
            raise ConfigError(f"{arg}: {e}") from e
    kinds = {**{n: KINDS["reward"] for n in rewards}, **{n: KINDS["heldout"] for n in heldout_rewards}}

    features = features or ("toy_oracle" if toy else "clip")
    reference = reference if reference is not None else ("toyworld" if toy else None)
    if any(n.startswith("toy_") for n in built) or features == "toy_oracle" or reference == "toyworld":
        from .toyworld import parse_prompt

        for p in prompt_list:
            try:
                parse_prompt(p)
            except ValueError as e:
                raise ConfigError(f"--prompts: the toy world's rewards/features/reference need toy-world captions: {e}") from e
    if reference not in (None, "toyworld"):
        try:
            image_files(reference)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--reference: {e}") from e
    extractor = None
    if features != "none":
        try:
            extractor = load_features(features, **(feature_options or {}))
        except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
            raise ConfigError(f"--features: {e}") from e
    elif reference is not None:
        raise ConfigError("--reference needs a feature space; drop --features none")
    if reference is not None and len(prompt_list) * images_per_prompt < 2:
        raise ConfigError("a Fréchet distance needs at least 2 images per model; raise --images-per-prompt or add prompts")

    if logs is None:  # the training logs of the checkpoints' runs, when they are there
        found = dict.fromkeys(c.parent.parent / "log.jsonl" for c in ckpts if c.parent.name == "checkpoints")
        log_list = [(p.parent.name, p) for p in found if p.is_file()]
    else:
        log_list = []
        for p in map(Path, logs):
            if not p.is_file():
                raise ConfigError(f"--logs {str(p)!r} is not a file; give a run's log.jsonl")
            log_list.append((p.parent.name or str(p), p))
    sampling = dict(images_per_prompt=images_per_prompt, seed=seed, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, eta=eta, batch_size=batch_size)
    # Checkpoints are sampled at the resolution and T5 length they were trained at (same model only).
    load_options = {k: train_cfg[k] for k in ("resolution", "max_sequence_length")
                    if train_cfg.get(k) is not None and train_cfg.get("model") == model}
    return EvalPlan(Path(out_dir), model, models, prompt_list, built, kinds, extractor, reference, log_list, sampling, toy,
                    load_options)


def _check_checkpoints_fit(unet, checkpoints: List[Path]) -> None:
    """Refuse, before the first sample, checkpoints whose weight names differ from the model's (safetensors headers only)."""
    from safetensors import safe_open

    expected = set(unet.state_dict())
    for c in checkpoints:
        if (c / "lora").is_dir():  # LoRA runs: the diffusers-format adapters are loaded onto the base instead
            continue
        with safe_open(str(next((c / "unet").glob("*.safetensors"))), framework="pt") as f:
            keys = set(f.keys())
        if keys != expected:
            missing, extra = sorted(expected - keys)[:3], sorted(keys - expected)[:3]
            raise ConfigError(f"--checkpoints {str(c)!r} was not trained from this --model: missing {missing}, unexpected {extra}")


def _eval_features(eval_dir: Path, samples: List[Dict], extractor, chunk: int = 256):
    """Features of an evaluation's saved PNGs (what the gallery shows), read in chunks."""
    import torch
    from PIL import Image

    from .features import load_images

    files = [eval_dir / s["file"] for s in samples]
    with Image.open(files[0]) as im:
        size = (im.height, im.width)
    return torch.cat([extractor(load_images(files[i:i + chunk], size)) for i in range(0, len(files), chunk)]), size


def _reference_features(plan: EvalPlan, flat_prompts: List[str], size: Tuple[int, int], extractor, seed: int):
    """Features of real data: toy-world renders of the same prompts (seeded), or the images of a folder."""
    import torch

    from .features import image_files, load_images

    if plan.reference == "toyworld":
        from .toyworld import parse_prompt, render

        images = render([parse_prompt(p) for p in flat_prompts], generator=torch.Generator().manual_seed(seed))
        return extractor((images * 255).round() / 255)  # quantised like the saved PNGs
    files = image_files(plan.reference)
    return torch.cat([extractor(load_images(files[i:i + 256], size)) for i in range(0, len(files), 256)])


def _stat(values) -> Dict[str, float]:
    import torch

    v = torch.as_tensor(values, dtype=torch.float64)
    return {"mean": v.mean().item(), "std": v.std(unbiased=False).item(), "n": int(v.numel())}


def run_eval(plan: EvalPlan, device: str = "auto", progress: bool = True) -> Dict[str, Any]:
    """Sample and score every model of `plan`, compute set metrics, write the gallery, JSON and CSV; returns the summary."""
    from tqdm.auto import tqdm

    from ._atomic import atomic_write_text
    from .checkpoint import load_checkpoint
    from .evaluation import evaluate_pipeline
    from .gallery import build_gallery
    from .lora import ADAPTER_NAME, load_lora
    from .metrics import diversity_within_prompt, frechet_distance_features
    from .models import load_pipeline, resolve_device

    out = plan.out_dir
    dev = resolve_device(device)
    pipeline = load_pipeline(plan.model, dev, progress, **plan.load_options)
    pipeline.check_prompts(plan.prompts, field_name="--prompts: prompt", allow_empty=False)
    _check_checkpoints_fit(pipeline.unet, [c for _, c in plan.models if c is not None])
    for r in plan.rewards.values():
        r.to(dev)
    s = plan.sampling
    sample_kw = {k: s[k] for k in ("images_per_prompt", "seed", "num_inference_steps", "guidance_scale", "eta", "batch_size")}
    taken: set = set()
    results: List[Dict[str, Any]] = []
    for label, ckpt in tqdm(plan.models, desc="models", disable=not progress):
        lora = ckpt is not None and (ckpt / "lora").is_dir()
        if lora:  # adapters on top of the base weights, removed again before the next model
            load_lora(pipeline.unet, ckpt / "lora")
        elif ckpt is not None:
            load_checkpoint(ckpt, pipeline.unet, None)
        pipeline.unet.eval()
        eval_dir = out / "evals" / _slug(label, taken)
        try:
            res = evaluate_pipeline(pipeline, plan.prompts, plan.rewards, out_dir=eval_dir, progress=progress, **sample_kw)
        finally:
            if lora:
                pipeline.unet.delete_adapters([ADAPTER_NAME])
        results.append({"label": label, "checkpoint": str(ckpt) if ckpt else None, "eval_dir": eval_dir, "result": res})

    table: Dict[str, Dict[str, Dict[str, Any]]] = {}
    ref = floor = None
    for item in results:
        res, label = item["result"], item["label"]
        row = {k: {**v, "n": len(res["samples"]), "kind": plan.kinds.get(k, KINDS["reward"])} for k, v in res["metrics"].items()}
        if plan.toy:
            row.update(_oracle_breakdown(item["eval_dir"], res["samples"]))
        if plan.features is not None:
            feats, size = _eval_features(item["eval_dir"], res["samples"], plan.features)
            flat = [x["prompt"] for x in res["samples"]]
            if s["images_per_prompt"] >= 2:
                row["diversity"] = {**diversity_within_prompt(feats, flat), "kind": KINDS["diversity"]}
            if plan.reference is not None:
                if ref is None:
                    ref = _reference_features(plan, flat, size, plan.features, s["seed"])
                    if plan.reference == "toyworld":  # two independent real draws: the distance's noise floor
                        floor = frechet_distance_features(ref, _reference_features(plan, flat, size, plan.features, s["seed"] + 1))
                row["frechet_distance"] = {"mean": frechet_distance_features(feats, ref), "std": None, "n": len(flat),
                                           "kind": KINDS["fd"]}
        table[label] = row

    feature_name = getattr(plan.features, "name", None)
    summary = {
        "models": [{"label": i["label"], "checkpoint": i["checkpoint"], "eval_dir": str(i["eval_dir"].relative_to(out))}
                   for i in results],
        "metrics": table,
        "settings": {"model": plan.model, "num_prompts": len(plan.prompts), **{k: s[k] for k in sample_kw},
                     "features": feature_name, "reference": plan.reference, "real_vs_real_frechet_distance": floor},
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "metrics.csv", _metrics_csv(summary))
    per_image = [{"model": i["label"], **x, "file": str((i["eval_dir"] / x["file"]).relative_to(out))}
                 for i in results for x in i["result"]["samples"]]
    atomic_write_text(out / "samples.json", json.dumps(per_image, indent=1))
    notes = (f"{len(plan.prompts)} prompts × {s['images_per_prompt']} images, seed {s['seed']} (same noise for every model), "
             f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}, η {s['eta']}. Hover an image for its scores.")
    if feature_name:
        notes += f" Diversity and Fréchet distance use '{feature_name}' features"
        notes += f"; real data: {plan.reference}." if plan.reference else "."
    if floor is not None:
        notes += f" Fréchet distance between two independent real draws: {floor:.3f}."
    shown_model = Path(plan.model).name if Path(plan.model).exists() else plan.model
    gallery = build_gallery([(i["label"], i["eval_dir"]) for i in results], out / "gallery.html",
                            title=f"genft eval: {shown_model}", notes=notes, metrics=table, logs=plan.logs)
    summary["gallery"] = str(gallery)
    return summary


def _oracle_breakdown(eval_dir: Path, samples: List[Dict]) -> Dict[str, Dict[str, Any]]:
    """The toy-world oracle's per-attribute accuracy (digit, stroke colour, background colour, all) on saved images."""
    from .features import load_images
    from .toyworld import OracleEvaluator

    images = load_images([eval_dir / x["file"] for x in samples], (16, 16))
    verdict = OracleEvaluator().evaluate(images, [x["prompt"] for x in samples])
    return {f"oracle_accuracy/{k}": {**_stat(verdict[f"{k}_correct"].float()), "kind": KINDS["oracle"]}
            for k in ("digit", "fg", "bg", "all")}


def _metrics_csv(summary: Dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "checkpoint", "metric", "kind", "mean", "std", "n"])
    ckpt = {m["label"]: m["checkpoint"] or "" for m in summary["models"]}
    for label, row in summary["metrics"].items():
        for name, m in row.items():
            std = "" if m.get("std") is None else repr(m["std"])
            writer.writerow([label, ckpt[label], name, m["kind"], repr(m["mean"]), std, m.get("n", "")])
    return buf.getvalue()


# ----- command line -------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to the `genft` parser's subparsers."""
    e = sub.add_parser("eval", help="evaluate the base model and checkpoints with fixed seeds; write a gallery, JSON and CSV",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--out", required=True, help="output folder (gallery.html, metrics.json, metrics.csv, samples.json, evals/)")
    e.add_argument("--checkpoints", nargs="*", default=[], help="checkpoint folders (e.g. RUN/checkpoints/final)")
    e.add_argument("--model", default=None, help="base model: 'toyworld', a hub id or a diffusers folder (default: the checkpoints' config)")
    e.add_argument("--no-base", action="store_true", help="evaluate only the checkpoints, not the base model")
    e.add_argument("--labels", nargs="*", default=None, help="column names, one per model (base first)")
    e.add_argument("--prompts", default="toyworld:heldout", help="'toyworld:heldout', 'toyworld:train' or a text file, one prompt a line")
    e.add_argument("--max-prompts", type=int, default=0, help="use at most this many prompts (0: all)")
    e.add_argument("--rewards", nargs="*", default=None, help="rewards to measure (default: the checkpoints' training reward)")
    e.add_argument("--heldout-rewards", nargs="*", default=None, help="held-out rewards (default: the checkpoints' eval_rewards)")
    e.add_argument("--reward-options", default=None, help="YAML mapping {reward: {arg: value}}, e.g. '{clip_score: {pretrained: /w.bin}}'")
    e.add_argument("--features", default=None, help="feature space for diversity and Fréchet distance: toy_oracle, toy_strokes, clip, dino, pixels, "
                                                     "'module:Class' or none (default: toy_oracle for the toy world, else clip)")
    e.add_argument("--feature-option", action="append", default=[], metavar="KEY=VALUE", help="feature extractor argument (repeatable)")
    e.add_argument("--reference", default=None, help="real data for the Fréchet distance: 'toyworld' or an image folder (default: toyworld for the toy world)")
    e.add_argument("--logs", nargs="*", default=None, help="training log.jsonl files to plot (default: the checkpoints' runs)")
    e.add_argument("--images-per-prompt", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=20, help="sampler steps")
    e.add_argument("--guidance-scale", type=float, default=3.0)
    e.add_argument("--eta", type=float, default=1.0, help="DDIM η")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `genft eval` from parsed arguments; prints the gallery path and the metrics table."""
    import yaml

    from .config import parse_overrides

    try:
        reward_options = yaml.safe_load(args.reward_options) if args.reward_options else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--reward-options is not YAML: {e}") from e
    if reward_options is not None and not isinstance(reward_options, dict):
        raise ConfigError(f"--reward-options must be a mapping {{reward: {{arg: value}}}}, got {reward_options!r}")
    plan = plan_eval(
        args.out, args.checkpoints, model=args.model, prompts=args.prompts, rewards=args.rewards,
        heldout_rewards=args.heldout_rewards, reward_options=reward_options, labels=args.labels,
        include_base=not args.no_base, max_prompts=args.max_prompts, features=args.features,
        feature_options=parse_overrides(args.feature_option), reference=args.reference, logs=args.logs,
        images_per_prompt=args.images_per_prompt, seed=args.seed, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, eta=args.eta, batch_size=args.batch_size,
    )
    summary = run_eval(plan, device=args.device, progress=not args.no_progress)
    labels = [m["label"] for m in summary["models"]]
    names = list(dict.fromkeys(k for row in summary["metrics"].values() for k in row))
    print(f"\n{'metric':28s}" + "".join(f" {lab[:22]:>22s}" for lab in labels))
    for name in names:
        cells = []
        for lab in labels:
            m = summary["metrics"][lab].get(name)
            cells.append("–" if m is None else f"{m['mean']:.3f}" + ("" if m.get("std") is None else f" ± {m['std']:.3f}"))
        print(f"{name[:28]:28s}" + "".join(f" {c:>22s}" for c in cells))
    print(f"\ngallery: {Path(summary['gallery']).resolve()}")
    return 0
