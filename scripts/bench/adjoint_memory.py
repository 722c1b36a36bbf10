"""Peak memory of Adjoint Matching (collect + one loss/backward) vs direct backprop through the sampler.

Adjoint Matching keeps one step's graph at a time (lean adjoint by VJPs, then a regression on a few
steps), so its memory should stay flat in the number of sampler steps; backprop through the sampler
(DRaFT/ReFL-style) keeps every step's activations and grows linearly. Prints, for 10/20/40 steps,
the peak bytes autograd holds for backward (CPU and CUDA; tracemalloc cannot see torch's CPU
allocator, so a saved-tensor hook counts them) and `torch.cuda.max_memory_allocated` (CUDA only),
with the ratios backprop / Adjoint Matching and N steps / first steps.

    python scripts/bench/adjoint_memory.py --family diffusion --steps 10 20 40 --batch 4 --size 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[2]


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward that are alive at once (live and peak), on any device.

    Use as a context manager: `with SavedTensorMeter() as m: ...; m.peak`. Tensors saved twice are
    counted twice, so the figure is an upper bound that is comparable between runs.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.count = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.live += n
        self.count += 1
        self.peak = max(self.peak, self.live)
        return _Held(t, n, self)

    @staticmethod
    def _unpack(held: "_Held") -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    __slots__ = ("tensor", "nbytes", "meter")

    def __init__(self, tensor: torch.Tensor, nbytes: int, meter: SavedTensorMeter):
        self.tensor, self.nbytes, self.meter = tensor, nbytes, meter

    def __del__(self):
        self.meter.live -= self.nbytes


class Brightness(torch.nn.Module):
    """Differentiable mean-brightness reward with the RewardModel call signature."""

    differentiable = True
    name = "brightness"

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def build_pipeline(family: str, size: int, device: str):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_diffusion_pipeline, tiny_flow_pipeline, tiny_unet

    pipe = tiny_flow_pipeline() if family == "flow" else tiny_diffusion_pipeline()
    if size != 8:
        pipe.unet = tiny_unet(sample_size=size)
    return pipe.to(device)


def am_run(pipe, family: str, steps: int, batch: int, generator_seed: int = 0) -> Callable[[], None]:
    """collect (reward gradient + lean adjoint) and one loss/backward of Adjoint Matching."""
    import copy

    from genft.methods.adjoint_matching import AdjointMatching, AdjointMatchingConfig

    cfg = AdjointMatchingConfig(num_inference_steps=steps, guidance_scale=1.0, prompts_per_round=1, samples_per_prompt=batch,
                                train_batch_size=batch, timesteps_per_trajectory=4, prompt_dropout=0.0, loss_quantile=1.0,
                                reward_multiplier=100.0, eval_rewards=[], reward="brightness")
    ref = copy.deepcopy(pipe.unet).requires_grad_(False)
    method = AdjointMatching(cfg, pipe, ref)
    method.attach(reward=Brightness())
    prompts = ["a red cat"] * batch
    gen = torch.Generator(device=pipe.device).manual_seed(generator_seed)
    traj = pipe.rollout(prompts, generator=gen, num_inference_steps=steps, guidance_scale=1.0, **method.rollout_kwargs())

    def run() -> None:
        method.collect(traj, None, None)
        for mb in method.minibatches(torch.Generator().manual_seed(0)):
            loss, _ = method.loss(mb, 0)
            loss.backward()
        method.extra_step(0)

    return run


def backprop_run(pipe, family: str, steps: int, batch: int, generator_seed: int = 0) -> Callable[[], None]:
    """Reward of a sample built with gradients through every sampler step, backpropagated to the weights."""
    from genft.adjoint import MEMORYLESS_DDIM_ETA, MEMORYLESS_FLOW_NOISE_LEVEL

    prompts = ["a red cat"] * batch
    emb = pipe.encode_prompt(prompts)
    level = MEMORYLESS_FLOW_NOISE_LEVEL if family == "flow" else MEMORYLESS_DDIM_ETA
    timesteps = pipe.timesteps(steps)
    extra: Dict[int, Dict] = {}
    if family == "flow":
        sig = pipe.sigmas(steps)
        extra = {k: {"sigma_next": sig[k + 1:k + 2].expand(batch), "sampler": "sde"} for k in range(steps)}
    gen = torch.Generator(device=pipe.device).manual_seed(generator_seed)
    noises = [torch.randn(batch, *pipe.latent_shape, generator=gen, device=pipe.device) for _ in range(steps + 1)]
    reward = Brightness()

    def run() -> None:
        x = noises[0]
        for k in range(steps):
            t = timesteps[k:k + 1].expand(batch)
            step = pipe.score_transition(x, x.detach(), t, emb, None, 1.0, level, steps, **extra.get(k, {}))
            x = step.mean + step.std.view(-1, *([1] * (x.ndim - 1))) * noises[k + 1]
        reward(pipe.decode(x), prompts).sum().backward()

    return run


def measure(run: Callable[[], None], device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with SavedTensorMeter() as meter:
        run()
    out = {"saved_peak": float(meter.peak)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak"] = float(torch.cuda.max_memory_allocated() - base)
    return out


def main(argv: List[str] = None) -> Dict[int, Dict[str, Dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["diffusion", "flow"], default="diffusion")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="latent side of the tiny UNet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    device = torch.device(args.device)
    torch.manual_seed(0)
    pipe = build_pipeline(args.family, args.size, args.device)
    pipe.unet.requires_grad_(True)
    results: Dict[int, Dict[str, Dict[str, float]]] = {}
    for steps in args.steps:
        results[steps] = {
            "adjoint_matching": measure(am_run(pipe, args.family, steps, args.batch), device),
            "backprop": measure(backprop_run(pipe, args.family, steps, args.batch), device),
        }
        pipe.unet.zero_grad(set_to_none=True)
    keys = ["saved_peak"] + (["cuda_peak"] if device.type == "cuda" else [])
    first = args.steps[0]
    print(f"family={args.family} device={device} batch={args.batch} latent={tuple(pipe.latent_shape)}")
    for key in keys:
        print(f"\n{key} (MiB)   steps | adjoint_matching | backprop | backprop/AM | AM vs {first} steps | backprop vs {first} steps")
        for steps, r in results.items():
            am, bp = r["adjoint_matching"][key], r["backprop"][key]
            am0, bp0 = results[first]["adjoint_matching"][key], results[first]["backprop"][key]
            print(f"{'':>14}{steps:5d} | {am / 2**20:16.2f} | {bp / 2**20:8.2f} | {bp / am:11.2f} | {am / am0:17.2f} | {bp / bp0:17.2f}")
    return results


if __name__ == "__main__":
    main()
