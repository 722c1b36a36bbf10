"""Overhead of genft's log-prob bookkeeping against bare diffusers, measured side by side in one run.

    python scripts/bench/overhead.py [--batch 8] [--steps 20] [--size 32] [--repeats 5] [--device cpu]

- rollout: `DiffusionPipeline.rollout` (every latent and log-prob stored) vs diffusers'
  `StableDiffusionPipeline.__call__` with the same UNet, text encoder, VAE, DDIM scheduler, steps,
  batch and guidance. Target ratio <= 1.03.
- update: one policy-gradient update over T stored transitions (`score_transition` + clipped loss +
  backward) vs T x (UNet forward + backward) on the same batch. Target ratio <= 1.10.
Timings alternate between the two sides on every repeat so machine noise hits both; medians are
reported. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from genft.losses import clipped_policy_loss  # noqa: E402
from pipelines import DiffusionPipeline  # noqa: E402
from _tiny import tiny_tokenizer  # noqa: E402


def build(size: int, device: str):
    """A small SD-shaped model set: VAE with 4 latent channels, cross-attention UNet, CLIP text encoder."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16).eval()
    unet = UNet2DConditionModel(sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ours = DiffusionPipeline(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, vae=vae).to(device)
    bare = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler.from_config(sched.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    bare.set_progress_bar_config(disable=True)
    return ours, bare.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def paired_medians(a: Callable[[], None], b: Callable[[], None], repeats: int, device: str) -> Tuple[float, float]:
    """Median seconds of `a` and `b`, alternating them on every repeat after one warm-up each."""
    a(); b()  # noqa: E702 - warm-up
    ta: List[float] = []
    tb: List[float] = []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (latents are half)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    ours, bare = build(args.size, args.device)
    prompts = ["a red cat"] * args.batch
    gens = lambda: [torch.Generator(args.device).manual_seed(i) for i in range(args.batch)]  # noqa: E731

    def genft_rollout():
        with torch.no_grad():
            ours.rollout(prompts, generator=gens(), num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0)

    def diffusers_call():
        bare(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, generator=gens(),
             output_type="pt", height=args.size, width=args.size)

    t_ours, t_bare = paired_medians(genft_rollout, diffusers_call, args.repeats, args.device)
    print(f"device={args.device} batch={args.batch} steps={args.steps} image={args.size}px repeats={args.repeats} torch={torch.__version__}")
    print(f"rollout: genft {t_ours * 1e3:8.1f} ms | diffusers {t_bare * 1e3:8.1f} ms | ratio {t_ours / t_bare:.3f} (target <= 1.03)")

    traj = ours.rollout(prompts, generator=gens(), num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0)
    unet = ours.unet
    T = traj.num_steps
    neg = traj.negative_prompt_embeds

    def genft_update():
        unet.zero_grad(set_to_none=True)
        for k in range(T):
            ts = traj.timesteps[k].repeat(args.batch)
            step = ours.score_transition(traj.latents[:, k], traj.latents[:, k + 1], ts, traj.prompt_embeds, neg,
                                         args.guidance, 1.0, args.steps)
            loss = clipped_policy_loss(step.log_prob, traj.log_probs[:, k], torch.ones(args.batch), 1e-4, "ppo").mean()
            loss.backward()

    def bare_update():
        unet.zero_grad(set_to_none=True)
        emb = torch.cat([neg, traj.prompt_embeds])
        for k in range(T):
            x = traj.latents[:, k].repeat(2, 1, 1, 1)
            out = unet(x, traj.timesteps[k], encoder_hidden_states=emb).sample
            out.square().mean().backward()

    u_ours, u_bare = paired_medians(genft_update, bare_update, args.repeats, args.device)
    print(f"update : genft {u_ours * 1e3:8.1f} ms | T x (UNet fwd+bwd, CFG batch) {u_bare * 1e3:8.1f} ms | ratio {u_ours / u_bare:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
