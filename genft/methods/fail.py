"""FAIL: Flow Matching Adversarial Imitation Learning (Ma, Li, Zhang, Hu, Xie, arXiv 2602.12155; code HansPolo113/FAIL).

Post-training as imitation: a discriminator D learns to tell expert demonstrations from the
generator's ODE samples (GAIL's BCE), and the generator moves toward the experts without any reward:
- FAIL-PD (pathwise): minimise −log D(x̂) with gradients through the sampler. `pd_mode="one_step"` is
  the released code (re-noise a detached sample x0 to σ, take one Euler step with v_θ, reconstruct
  x̂0); `pd_mode="ode"` is the paper's differentiable ODE solve, `pd_steps` Euler steps of
  torchdiffeq.odeint from the rollout's noise.
- FAIL-PG (black box): GAIL rewards of the samples, normalised per prompt group with the group's
  expert counted in, drive PPO with FPO's likelihood-ratio surrogate ρ = exp(L_old − L_new), where L
  is the flow-matching loss on (t, ε) pairs frozen per sample at collection time.
Both may add FAIL's velocity-MSE KL to the frozen reference (`kl_weight`). D is updated in
`extra_step`, after the round's generator updates. Pure math lives in `genft.fail_math`.

The trainer's `reward` is only monitored (FAIL's code monitors HPSv3); the discriminator is the signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Tuple

import torch

from pipelines import Trajectory

from ..config import ConfigError, option
from ..fail_math import (REWARD_FORMS, cfm_losses, discriminator_loss, fpo_log_ratio, fpo_policy_loss, gail_reward,
                         generator_loss, gradient_penalty, group_advantages, one_step_reconstruction, prompt_groups,
                         velocity_kl)
from ..train_config import TrainConfig
from ._discriminator import build_discriminator, check_backbone_name
from ._expert import build_expert_set, check_expert_data
from .base import Method


@dataclass
class FAILConfig(TrainConfig):
    """FAIL settings. Defaults follow the released code (FLUX scripts) unless the help says otherwise."""

    method: str = option("fail", "Which finetuner runs: a name from genft.methods.")
    model: str = option("toyworld-flow", "Base generator (a flow-matching model): 'toyworld-flow', a hub id, or a local diffusers folder.")
    eval_eta: float = option(0.0, "Noise level of evaluation samples; 0 is the Euler ODE that FAIL samples and trains with.")
    variant: Literal["pd", "pg"] = option("pd", "'pd': pathwise gradients through the sampler (FAIL-PD); 'pg': black-box policy gradient with FPO ratios (FAIL-PG).")
    expert_data: str = option("toyworld:thin", "Expert demonstrations: a folder of images (each optionally with a same-named .txt caption) or 'toyworld:<style>' (bold, thin, italic): real digits in a stroke style the toy bases never saw.")
    expert_max_images: int = option(0, "Use at most this many images of an expert folder (0: all).")
    discriminator: str = option("cnn", "Discriminator backbone: 'cnn' (small trainable CNN, the toy world's), 'clip' (frozen open_clip image tower) or 'module:Class'.")
    discriminator_options: Dict[str, Any] = option({}, "Backbone constructor arguments, e.g. {width: 32} for cnn or {model: ViT-B-32, pretrained: /path/weights.bin} for clip.")
    disc_condition: Literal["auto", "prompt", "none"] = option("auto", "Condition D on the prompt (projection discriminator on the mean text-encoder state; FAIL's D reads the prompt too): 'auto' does when every expert has a caption (toy world, fully captioned folder).")
    disc_hidden: int = option(0, "Width of a hidden spectral-norm layer in the head (0: linear head, as FAIL's Qwen3-VL discriminator).")
    disc_lr: float = option(2e-4, "Discriminator AdamW learning rate (FAIL: 2e-6 for its 2B VLM; a toy CNN needs far more).")
    disc_steps: int = option(4, "Discriminator updates per round (FAIL: one per generator step).")
    disc_batch_size: int = option(32, "Generated and expert images per discriminator update (each).")
    disc_warmup_rounds: int = option(1, "Rounds that train only the discriminator before the generator moves (FAIL: 25 steps).")
    disc_grad_penalty: float = option(0.0, "γ of the R1 gradient penalty γ/2·‖∇_x D(expert)‖² (0 disables; FAIL uses none).")
    disc_max_grad_norm: float = option(1.0, "Gradient-norm clip of the discriminator (FAIL: 1.0; 0 disables).")
    pd_mode: Literal["one_step", "ode"] = option("one_step", "FAIL-PD's x̂: 'one_step' re-noises the detached sample and takes one Euler step (released code); 'ode' back-propagates through a pd_steps-step Euler solve with torchdiffeq (paper).")
    pd_steps: int = option(4, "Euler steps of the differentiable solve for pd_mode='ode' (memory grows with it).")
    pd_noise: Literal["original", "fresh"] = option("original", "Noise ε for re-noising / the ODE start: the rollout's own initial noise (FAIL's default) or fresh noise.")
    pg_reward: Literal["gail", "airl", "log_d"] = option("gail", "FAIL-PG reward from D: 'gail' −log(1−D) (released code), 'airl' log D − log(1−D), 'log_d' log D.")
    num_mc: int = option(8, "Frozen (t, ε) pairs per sample in FPO's flow-matching likelihood surrogate (FAIL: 8).")
    clip_range: float = option(1e-5, "ε of PPO's clip on the FPO ratio (FAIL: 1e-5).")
    log_ratio_clamp: float = option(3.0, "The FPO log-ratio L_old − L_new is clamped to ±this before exp (FAIL: 3).")
    expert_in_group: bool = option(True, "FAIL-PG: count each prompt's expert sample in its group's mean/std (FAIL's include_teacher_in_policy).")
    expert_in_policy: bool = option(True, "FAIL-PG: also train on the expert sample with its group advantage (needs expert_in_group).")
    kl_weight: float = option(0.0, "β of the velocity-MSE KL to the frozen reference, mean (v_θ − v_ref)² (FAIL-PG script: 0.05).")
    train_batch_size: int = option(8, "Samples per generator minibatch.")
    gradient_accumulation: int = option(1, "Minibatches per optimiser step.")
    inner_epochs: int = option(1, "Passes over each round's samples.")
    detach_uncond: bool = option(False, "FAIL-PD: stop gradients through the unconditional CFG branch.")

    def validate(self) -> None:
        super().validate()
        check_expert_data(self.expert_data, "expert_data")
        check_backbone_name(self.discriminator, "discriminator")
        for name in ["disc_steps", "disc_batch_size", "pd_steps", "num_mc", "train_batch_size", "gradient_accumulation", "inner_epochs"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ["expert_max_images", "disc_hidden", "disc_warmup_rounds", "disc_grad_penalty", "disc_max_grad_norm",
                     "clip_range", "kl_weight"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.disc_lr > 0 or not self.log_ratio_clamp > 0:
            raise ConfigError(f"disc_lr={self.disc_lr} and log_ratio_clamp={self.log_ratio_clamp} must be > 0")
        if self.expert_in_policy and not self.expert_in_group and self.variant == "pg":
            raise ConfigError("expert_in_policy=True needs expert_in_group=True (the expert's advantage is taken within its group); "
                              "set expert_in_group=true or expert_in_policy=false")
        if self.gradient_accumulation > self.rollout_batch_size:
            raise ConfigError(f"gradient_accumulation={self.gradient_accumulation} exceeds the {self.rollout_batch_size} samples per round "
                              "(prompts_per_round × samples_per_prompt); lower it or sample more")
        if self.pg_reward not in REWARD_FORMS:
            raise ConfigError(f"pg_reward={self.pg_reward!r} must be one of {REWARD_FORMS}")


class FAIL(Method):
    """FAIL-PD / FAIL-PG as Trainer hooks (see the module docstring)."""

    name = "fail"
    families = ("flow",)
    config_class = FAILConfig

    def __init__(self, config: FAILConfig, pipeline, reference_unet: torch.nn.Module):
        super().__init__(config, pipeline, reference_unet)
        self.expert = build_expert_set(config.expert_data, config.expert_max_images)
        if config.disc_condition == "prompt" and not self.expert.captioned:
            raise ConfigError(f"disc_condition='prompt' needs a caption for every expert, but expert_data={config.expert_data!r} "
                              "has images without a same-named .txt caption; add them or set disc_condition=none")
        self.conditional = config.disc_condition == "prompt" or (config.disc_condition == "auto" and self.expert.captioned)
        text_dim = self.text_features([""]).shape[-1] if self.conditional else 0
        torch.manual_seed(config.seed + 4099)  # the discriminator's initial weights
        self.discriminator = build_discriminator(config.discriminator, config.discriminator_options, config.disc_hidden, text_dim)
        self.discriminator.to(pipeline.device)
        self.disc_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        self.disc_optimizer = torch.optim.AdamW(self.disc_params, lr=config.disc_lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed + 7919)  # experts, (t, ε) pairs, σ picks
        self.rounds_seen = 0
        self.generator_active = False
        self.data: Dict[str, Any] = {}
        self._set_disc_trainable(False)

    # ----- sampling and collection ------------------------------------------------------------------
    def rollout_kwargs(self) -> Dict[str, Any]:
        """FAIL rolls out the deterministic Euler ODE (its samples are the policy's images)."""
        return {"sampler": "ode", "noise_level": 0.0}

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """The trainer's reward is a monitor only; FAIL's signal comes from the discriminator in `collect`."""
        return rewards.float()

    @torch.no_grad()
    def text_features(self, prompts) -> torch.Tensor | None:
        """The discriminator's prompt features [B, D]: the mean over tokens of the generator's text states (None if unconditional)."""
        if prompts is None:
            return None
        return self.pipeline.encode_prompt(list(prompts)).float().mean(1)

    def _disc(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """Discriminator logits [B] of images in [0, 1] with their prompts (ignored when D is unconditional)."""
        return self.discriminator(images, self.text_features(prompts) if self.conditional else None)

    def _set_disc_trainable(self, on: bool) -> None:
        for p in self.disc_params:
            p.requires_grad_(on)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the generator's latents (pixels in [-1, 1] without a VAE); the inverse of `decode`."""
        x = images.to(self.pipeline.device).float() * 2 - 1
        vae = self.pipeline.vae
        if vae is None:
            return x.to(self.pipeline.latent_dtype)
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.mean
        cfg = vae.config
        return ((z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).to(self.pipeline.latent_dtype)

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        self.generator_active = self.rounds_seen >= self.config.disc_warmup_rounds
        self.rounds_seen += 1
        lat = trajectory.latents
        self.data = {"images": trajectory.images.detach(), "prompts": list(trajectory.prompts), "metrics": {}, "chunks": None}
        if self.config.variant == "pd":
            text = self.text_features(trajectory.prompts) if self.conditional else None
            self.data["batch"] = {"x0": lat[:, -1], "noise": lat[:, 0], "prompt_embeds": trajectory.prompt_embeds,
                                  "negative_prompt_embeds": trajectory.negative_prompt_embeds, "text": text}
        else:
            self._collect_pg(trajectory)

    @torch.no_grad()
    def _collect_pg(self, trajectory: Trajectory) -> None:
        c, dev = self.config, self.pipeline.device
        images = trajectory.images.detach()
        distinct, groups = prompt_groups(trajectory.prompts)
        rewards = gail_reward(self._disc(images.to(dev), trajectory.prompts), c.pg_reward)
        expert_rewards = expert_images = None
        if c.expert_in_group:
            expert_images, captions = self.expert.sample(distinct, tuple(images.shape[-2:]), self.generator)
            expert_images = expert_images.to(dev)
            expert_rewards = gail_reward(self._disc(expert_images, captions), c.pg_reward)
        adv, expert_adv = group_advantages(rewards, groups.to(dev), expert_rewards)
        self.data["metrics"] = {"gail_reward": rewards.mean().item()}
        if expert_rewards is not None:
            self.data["metrics"]["gail_reward_expert"] = expert_rewards.mean().item()
        if not self.generator_active:  # discriminator warm-up: no generator update this round
            return
        x0, embeds = trajectory.latents[:, -1], trajectory.prompt_embeds
        if c.expert_in_policy and expert_images is not None:
            first = torch.tensor([trajectory.prompts.index(p) for p in distinct], dtype=torch.long, device=embeds.device)
            x0 = torch.cat([x0, self.encode_images(expert_images).to(x0.device)])
            embeds = torch.cat([embeds, embeds[first]])
            adv = torch.cat([adv, expert_adv])
        n = x0.shape[0]
        t = torch.rand(n, c.num_mc, generator=self.generator).clamp(1e-3, 1.0).to(dev)
        eps = torch.randn((n, c.num_mc, *x0.shape[1:]), generator=self.generator).to(dev, x0.dtype)
        chunks = self._partition(n)
        loss_old = torch.empty(n, device=dev)
        for idx in chunks:  # the same sub-batches the updates use, so the first ratio is exactly 1
            loss_old[idx.to(dev)] = self._cfm(x0[idx], embeds[idx], t[idx], eps[idx])[0]
        self.data["batch"] = {"x0": x0, "prompt_embeds": embeds, "t": t, "eps": eps, "loss_old": loss_old, "advantages": adv.float()}
        self.data["chunks"] = chunks

    def _partition(self, n: int) -> List[torch.Tensor]:
        """A shuffled split of n samples into minibatches whose count is a multiple of gradient_accumulation."""
        accum = self.config.gradient_accumulation
        k = -(-n // self.config.train_batch_size)
        k = -(-k // accum) * accum
        if k > n:
            raise ValueError(f"{n} samples per round cannot fill {k} minibatches (gradient_accumulation={accum}); "
                             "lower gradient_accumulation or sample more per round")
        return list(torch.tensor_split(torch.randperm(n, generator=self.generator), k))

    # ----- generator updates ------------------------------------------------------------------------
    def minibatches(self, generator: torch.Generator) -> Iterable[Dict[str, Any]]:
        if not self.data or not self.generator_active:
            return
        batch = self.data["batch"]
        n = batch["x0"].shape[0]
        for _ in range(self.config.inner_epochs):
            chunks = self.data["chunks"] if self.data["chunks"] is not None else self._partition(n)
            for idx in chunks:
                yield {k: (v[idx.to(v.device)] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _cfm(self, x0: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, unet=None):
        """FPO's surrogate: per-sample mean over the frozen pairs of the conditional flow-matching loss; also (v, x_t, t)."""
        n, m = t.shape
        x0r = x0[:, None].expand(n, m, *x0.shape[1:]).reshape(n * m, *x0.shape[1:]).float()
        epsr = eps.reshape(n * m, *x0.shape[1:]).float()
        tf = t.reshape(-1)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = (1 - tf.view(view)) * x0r + tf.view(view) * epsr
        v = self.pipeline.model_output(x_t, tf, embeds.repeat_interleave(m, dim=0), None, 1.0, unet=unet)
        return cfm_losses(v, x0r, epsr).view(n, m).mean(1), v, x_t, tf

    def loss(self, batch: Dict[str, Any], round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        if self.config.variant == "pg":
            return self._loss_pg(batch)
        return self._loss_pd(batch)

    def _loss_pg(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        c = self.config
        loss_new, v, x_t, tf = self._cfm(batch["x0"], batch["prompt_embeds"], batch["t"], batch["eps"])
        policy = fpo_policy_loss(batch["loss_old"], loss_new, batch["advantages"], c.clip_range, c.log_ratio_clamp)
        loss = policy.mean()
        ratio = fpo_log_ratio(batch["loss_old"], loss_new.detach(), c.log_ratio_clamp).exp()
        metrics = {"policy_loss": policy.mean().item(), "cfm_loss": loss_new.mean().item(), "ratio_mean": ratio.mean().item(),
                   "clip_frac": ((ratio - 1).abs() > c.clip_range).float().mean().item()}
        if c.kl_weight > 0:
            embeds = batch["prompt_embeds"].repeat_interleave(batch["t"].shape[1], dim=0)
            with torch.no_grad():
                v_ref = self.pipeline.model_output(x_t, tf, embeds, None, 1.0, unet=self.reference_unet)
            kl = velocity_kl(v, v_ref).mean()
            loss = loss + c.kl_weight * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    def _loss_pd(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        c, dev = self.config, self.pipeline.device
        x0 = batch["x0"].float()
        noise = batch["noise"].float()
        if c.pd_noise == "fresh":
            noise = torch.randn(x0.shape, generator=self.generator).to(dev)
        embeds, neg = batch["prompt_embeds"], batch["negative_prompt_embeds"]
        guidance = c.guidance_scale if neg is not None else 1.0
        states: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x detached, σ, v) for the KL

        def velocity(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            v = self.pipeline.model_output(x, sigma, embeds, neg, guidance, detach_uncond=c.detach_uncond)
            states.append((x.detach(), sigma.detach(), v))
            return v

        if c.pd_mode == "one_step":
            sig = self.pipeline.sigmas(c.num_inference_steps)
            k = torch.randint(c.num_inference_steps, (x0.shape[0],), generator=self.generator)
            s, sn = sig[k].to(dev), sig[k + 1].to(dev)
            view = (-1,) + (1,) * (x0.ndim - 1)
            x_t = (1 - s.view(view)) * x0 + s.view(view) * noise
            x_hat = one_step_reconstruction(x0, noise, s, sn, velocity(s, x_t))
        else:
            from torchdiffeq import odeint

            grid = self.pipeline.sigmas(c.pd_steps).to(dev)
            x_hat = odeint(velocity, noise, grid, method="euler")[-1]
        logits = self.discriminator(self.pipeline.decode(x_hat.to(self.pipeline.latent_dtype)), batch["text"])
        loss = generator_loss(logits).mean()
        metrics = {"generator_loss": loss.item(), "d_on_xhat": torch.sigmoid(logits.detach()).mean().item()}
        if c.kl_weight > 0:
            kls = []
            for x, sigma, v in states:
                with torch.no_grad():
                    v_ref = self.pipeline.model_output(x, sigma, embeds, neg, guidance, unet=self.reference_unet)
                kls.append(velocity_kl(v, v_ref).mean())
            kl = torch.stack(kls).mean()
            loss = loss + c.kl_weight * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    # ----- discriminator -----------------------------------------------------------------------------
    def extra_step(self, round_index: int) -> Dict[str, float]:
        """`disc_steps` GAIL updates of D on this round's samples against fresh expert images."""
        if not self.data:
            return {}
        c, dev = self.config, self.pipeline.device
        images, prompts = self.data["images"], self.data["prompts"]
        self._set_disc_trainable(True)
        self.discriminator.train()
        sums: Dict[str, float] = {}
        try:
            for _ in range(c.disc_steps):
                idx = torch.randperm(images.shape[0], generator=self.generator)[: c.disc_batch_size]
                fake = images[idx.to(images.device)].to(dev)
                fake_prompts = [prompts[i] for i in idx.tolist()]
                real, captions = self.expert.sample(fake_prompts, tuple(images.shape[-2:]), self.generator)
                real = real.to(dev)
                if c.disc_grad_penalty > 0:
                    real.requires_grad_(True)
                real_logits, fake_logits = self._disc(real, captions), self._disc(fake, fake_prompts)
                loss = discriminator_loss(real_logits, fake_logits)
                if c.disc_grad_penalty > 0:
                    penalty = gradient_penalty(real_logits, real)
                    loss = loss + 0.5 * c.disc_grad_penalty * penalty
                    sums["disc_r1"] = sums.get("disc_r1", 0.0) + penalty.item()
                self.disc_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.disc_max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.disc_params, c.disc_max_grad_norm)
                self.disc_optimizer.step()
                d_real, d_fake = torch.sigmoid(real_logits.detach()), torch.sigmoid(fake_logits.detach())
                step = {"disc_loss": loss.item(), "d_expert": d_real.mean().item(), "d_generated": d_fake.mean().item(),
                        "disc_acc": 0.5 * ((d_real > 0.5).float().mean() + (d_fake < 0.5).float().mean()).item()}
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
        finally:
            self._set_disc_trainable(False)
            self.discriminator.eval()
        out = {k: v / c.disc_steps for k, v in sums.items()}
        out.update(self.data.get("metrics", {}))
        out["generator_active"] = float(self.generator_active)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
                "generator": self.generator.get_state(), "rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.generator.set_state(state["generator"])
        self.rounds_seen = int(state["rounds_seen"])
