"""Diff-Instruct* (DI*; Luo, Zhang, Zhang, Geng, arXiv 2410.20898): reward fine-tuning of a one-step generator.

    max_θ  α_rev·E[r(g_θ(z, c), c)] − ∫ w(t) E_{x_t ~ p_θ,t}[ d(s_{p_θ,t}(x_t) − s^{cfg}_{ref,t}(x_t)) ] dt

with d the pseudo-Huber distance and the reference score guided by classifier-free guidance (DI*-IN).
The intractable generator score s_{p_θ,t} is an online *fake-score* UNet, initialised from the reference
and trained by denoising score matching on detached generator samples after every generator update
(`extra_step`); the generator minimises −α_rev·r + the tractable surrogate of `genft.di_star_math`,
whose gradient equals the divergence's. Math lives in `genft.di_star_math`.

Where the frozen teacher comes from: `reference_model` names a diffusion model ('toyworld', a folder or
a hub id); left empty, the diffusion base recorded in the one-step model (`OneStepPipeline.base_model`,
written to model_index.json as `genft_base_model`) is used. It must share the generator's text encoder
and latent space. It needs no copy of the generator, so the Trainer makes none (`uses_reference = False`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

from pipelines import DiffusionPipeline, Trajectory, detect_family

from ..config import ConfigError, option
from ..di_star_math import (denoising_score_matching_loss, guided, pseudo_huber, sample_timesteps, score_divergence_surrogate,
                            vp_noise)
from ..train_config import TrainConfig
from .base import Method


@dataclass
class DiffInstructStarConfig(TrainConfig):
    """DI* settings. Published (README Table 3): α_rev = 100 with α_cfg = 7.5 is best; learning rates, c, w(t) and the
    time range are not published, so those defaults follow DMD2 (two-time-scale fake-score updates, t in [0.02, 0.98]·T)."""

    method: str = option("diff_instruct_star", "Which finetuner runs: a name from genft.methods.")
    model: str = option("toyworld-one-step", "One-step generator: 'toyworld-one-step' (built from the cached toy world at t*=900) or a one-step folder written by OneStepPipeline.save_pretrained.")
    reward: Union[str, Dict[str, float]] = option("toy_proxy_clip", "Reward to maximise (as in TrainConfig). DI* differentiates it, so it needs a differentiable mode: the default is the toy world's proxy CLIPScore (toy_oracle has none).")
    eval_rewards: List[str] = option(["toy_oracle", "toy_oracle_accuracy"], "Held-out rewards measured at evaluation only, never optimised.")
    num_inference_steps: int = option(1, "Sampler steps: a one-step generator takes exactly 1.")
    guidance_scale: float = option(1.0, "CFG of the generator itself: must be 1 (DI*-IN puts guidance inside the reference score; see reference_guidance_scale).")
    eta: float = option(0.0, "Must be 0: the one-step generator is deterministic given its noise.")
    eval_eta: float = option(0.0, "Must be 0 (deterministic one-step sampling).")
    learning_rate: float = option(1e-5, "AdamW learning rate of the generator (not published for DI*; the toy recipe uses 1e-4).")

    reference_model: str = option("", "Frozen teacher diffusion model: '' uses the base the one-step model records (genft_base_model), else 'toyworld', a diffusion folder or a hub id. It must share the generator's text encoder and latent shape.")
    reward_weight: float = option(100.0, "α_rev: weight of −reward in the generator loss (paper's best: 100 with ImageReward; scale with the reward's units).")
    reference_guidance_scale: float = option(7.5, "α_cfg: classifier-free guidance inside the reference score (DI*-IN; paper's best 7.5 on SDXL).")
    pseudo_huber_c: float = option(0.03, "c of the pseudo-Huber distance d(y) = √(‖y‖²+c²)−c on ε-unit score differences, per √dimension: the c used is this·√(C·H·W). Small: ≈‖y‖ (robust); large: ≈‖y‖²/2c (Fisher).")
    divergence_weight: float = option(1.0, "Weight of the score-divergence surrogate relative to the reward term (the paper's objective has 1).")
    t_min: float = option(0.02, "Smallest diffusion time of the divergence and of fake-score training, as a fraction of the training timesteps (DMD2: 0.02).")
    t_max: float = option(0.98, "Largest diffusion time, as a fraction of the training timesteps (DMD2: 0.98).")
    fake_learning_rate: float = option(1e-5, "AdamW learning rate of the fake-score UNet (DMD2 uses the generator's).")
    fake_updates_per_step: int = option(5, "Fake-score (denoising score matching) updates after each generator update (DMD2's two-time-scale rule: 5).")
    fake_batch_size: int = option(0, "Generator samples per fake-score update (0: the round's batch size).")
    fake_max_grad_norm: float = option(1.0, "Gradient-norm clip of the fake-score updates (0 disables).")
    gradient_accumulation: int = option(1, "Chunks the round's batch is split into for one generator step (memory only; same gradient).")

    def validate(self) -> None:
        super().validate()
        if self.num_inference_steps != 1:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps}: DI* trains a one-step generator; set num_inference_steps=1")
        if self.guidance_scale != 1.0:
            raise ConfigError(f"guidance_scale={self.guidance_scale}: the one-step generator samples without CFG in DI*-IN; "
                              "set guidance_scale=1 and put the guidance in reference_guidance_scale")
        if self.eta != 0 or self.eval_eta != 0:
            raise ConfigError(f"eta={self.eta}, eval_eta={self.eval_eta}: a one-step generator is deterministic; set both to 0")
        if self.reward_weight < 0 or self.divergence_weight < 0:
            raise ConfigError(f"reward_weight={self.reward_weight} and divergence_weight={self.divergence_weight} must be >= 0")
        if self.reward_weight == 0 and self.divergence_weight == 0:
            raise ConfigError("reward_weight and divergence_weight are both 0: nothing to train; e.g. reward_weight=100")
        if self.reference_guidance_scale < 1.0:
            raise ConfigError(f"reference_guidance_scale={self.reference_guidance_scale} must be >= 1 (1 disables guidance)")
        if not self.pseudo_huber_c > 0:
            raise ConfigError(f"pseudo_huber_c={self.pseudo_huber_c} must be > 0, e.g. 0.03")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ConfigError(f"t_min={self.t_min}, t_max={self.t_max}: need 0 <= t_min <= t_max <= 1 (fractions of the training timesteps)")
        if not self.fake_learning_rate > 0:
            raise ConfigError(f"fake_learning_rate={self.fake_learning_rate} must be > 0, e.g. 1e-5")
        for name in ["fake_updates_per_step", "gradient_accumulation"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.fake_batch_size < 0 or self.fake_max_grad_norm < 0:
            raise ConfigError(f"fake_batch_size={self.fake_batch_size} and fake_max_grad_norm={self.fake_max_grad_norm} must be >= 0")
        if self.rollout_batch_size % self.gradient_accumulation:
            raise ConfigError(f"prompts_per_round*samples_per_prompt={self.rollout_batch_size} must be a multiple of "
                              f"gradient_accumulation={self.gradient_accumulation}; change one of them")
        if self.reference_model and self.reference_model != "toyworld":
            family = detect_family(self.reference_model)
            if family not in (None, "diffusion"):
                raise ConfigError(f"reference_model={self.reference_model!r} is a {family} model; DI*'s teacher must be a "
                                  "diffusion model (e.g. reference_model=toyworld or the base the one-step model came from)")


def load_teacher(reference_model: str, pipeline, device: torch.device) -> DiffusionPipeline:
    """The frozen teacher diffusion pipeline for `pipeline` (a OneStepPipeline): `reference_model` or its recorded base."""
    source = reference_model or getattr(pipeline, "base_model", None)
    if not source:
        raise ConfigError("reference_model is empty and the one-step model records no base diffusion model "
                          "(model_index.json genft_base_model); set reference_model=<diffusion folder or 'toyworld'>")
    if source == "toyworld":
        from ..toyworld import load_or_pretrain

        source = str(load_or_pretrain(progress=False))
    teacher = DiffusionPipeline.from_pretrained(source, device=device)
    shape_ok = tuple(teacher.latent_shape) == tuple(pipeline.latent_shape)
    if not shape_ok or teacher.unet.config.cross_attention_dim != pipeline.unet.config.cross_attention_dim:
        raise ConfigError(f"reference_model={source!r} has latents {tuple(teacher.latent_shape)} and text width "
                          f"{teacher.unet.config.cross_attention_dim}, the generator {tuple(pipeline.latent_shape)} and "
                          f"{pipeline.unet.config.cross_attention_dim}; use the diffusion base the generator was built from")
    probe = ["", "a"]
    if not torch.allclose(teacher.encode_prompt(probe).to(device), pipeline.encode_prompt(probe).to(device), atol=1e-5):
        raise ConfigError(f"reference_model={source!r} encodes prompts differently from the generator's text encoder; DI* "
                          "feeds the generator's text states to the teacher, so use the base the generator was built from")
    return teacher


class DiffInstructStar(Method):
    """DI* as hooks for the Trainer (see module docstring). One generator step per round, then fake-score steps."""

    name = "diff_instruct_star"
    config_class = DiffInstructStarConfig
    families = ("one_step",)
    needs_reward_gradient = True
    uses_reference = False

    def __init__(self, config: DiffInstructStarConfig, pipeline, reference_unet: Optional[torch.nn.Module] = None):
        super().__init__(config, pipeline, reference_unet)
        family = getattr(pipeline, "family", "diffusion")
        if family != "one_step":
            raise ConfigError(f"method='diff_instruct_star' trains one-step generators, but the model is a {family} model; "
                              "build one with OneStepPipeline.from_diffusion (or model=toyworld-one-step)")
        device = pipeline.device
        teacher = load_teacher(config.reference_model, pipeline, device)
        self.teacher_unet = teacher.unet.requires_grad_(False).eval()
        self.scheduler = teacher.scheduler
        self.fake_unet = copy.deepcopy(self.teacher_unet).to(device).train()
        self.fake_unet.requires_grad_(False)  # switched on only inside extra_step
        self.fake_optimizer = torch.optim.AdamW(self.fake_unet.parameters(), lr=config.fake_learning_rate,
                                                betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        n = self.scheduler.config.num_train_timesteps
        self.t_range = (int(round(config.t_min * (n - 1))), int(round(config.t_max * (n - 1))))
        dims = 1
        for s in pipeline.latent_shape:
            dims *= int(s)
        self.huber_c = config.pseudo_huber_c * dims**0.5
        self.generator = torch.Generator().manual_seed(config.seed + 4241)
        self.reward = None
        self.records: Optional[Dict[str, Any]] = None
        self._empty_embed: Optional[torch.Tensor] = None
        self._steps_this_round = 0

    # ----- wiring ------------------------------------------------------------------------------
    def attach(self, *, reward) -> None:
        """Keep the differentiable reward (the Trainer calls this); DI* back-propagates through it."""
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"Diff-Instruct* needs a differentiable reward; {getattr(reward, 'name', reward)!r} was built "
                             "with differentiable=False. Build it with differentiable=True")
        self.reward = reward

    def rollout_kwargs(self) -> Dict[str, Any]:
        return {"eta": 0.0}

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """Unused (the signal is ∇r); the raw rewards are passed through."""
        return rewards.float()

    def _empty(self, batch: int) -> torch.Tensor:
        if self._empty_embed is None:
            self._empty_embed = self.pipeline.encode_prompt([""])
        return self._empty_embed.expand(batch, *self._empty_embed.shape[1:])

    # ----- the two scores at x_t -----------------------------------------------------------------
    def _alpha_prod(self, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.float()[t.cpu()].to(self.pipeline.device)

    def _eps(self, unet, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, guidance: float) -> torch.Tensor:
        """ε̂ of `unet` at (x_t, t), guided with the empty prompt when guidance > 1 (float32)."""
        neg = self._empty(x_t.shape[0]).to(emb.device) if guidance > 1.0 else None
        return self.pipeline.model_output(x_t, t.to(x_t.device), emb, neg, guidance, unet=unet)

    def _noise(self, x0: torch.Tensor):
        """(x_t, t, ε): t uniform on the configured range and ε ~ N(0, I), both from the method's own generator."""
        batch = x0.shape[0]
        t = sample_timesteps(batch, *self.t_range, generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        x_t, _, _ = vp_noise(x0, eps, self._alpha_prod(t))
        return x_t, t, eps

    def divergence_terms(self, x0: torch.Tensor, emb: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample DI* surrogate (ε-units: scores −ε̂) and the divergence value d(y) at x_t = α_t x0 + σ_t ε."""
        x_t, t, eps = self._noise(x0)
        eps_fake = self._eps(self.fake_unet, x_t, t, emb, 1.0)
        eps_ref = self._eps(self.teacher_unet, x_t, t, emb, self.config.reference_guidance_scale)
        surrogate = score_divergence_surrogate(-eps_fake, -eps_ref, -eps, self.huber_c)
        with torch.no_grad():
            divergence = pseudo_huber(eps_ref - eps_fake, self.huber_c)
        return {"surrogate": surrogate, "divergence": divergence}

    # ----- the loop hooks ----------------------------------------------------------------------
    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        """Keep the round's noise and text states: the generator step re-generates x0 = g_θ(z, c) with gradients."""
        if self.reward is None:
            raise RuntimeError("Diff-Instruct* has no reward model to differentiate: call method.attach(reward=...) "
                               "(genft.Trainer does this) before collect")
        self.records = {"noise": trajectory.latents[:, 0], "prompt_embeds": trajectory.prompt_embeds,
                        "prompts": list(trajectory.prompts)}
        self._steps_this_round = 0

    def minibatches(self, generator: torch.Generator) -> Iterable[Dict[str, torch.Tensor]]:
        """The round's samples in `gradient_accumulation` chunks ({"index": LongTensor}), i.e. one generator step."""
        if self.records is None:
            return
        n = self.records["noise"].shape[0]
        for idx in torch.randperm(n, generator=generator).chunk(self.config.gradient_accumulation):
            yield {"index": idx}

    def loss(self, batch: Dict[str, torch.Tensor], round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """−α_rev·r(g_θ(z,c)) + divergence_weight·surrogate, averaged over the chunk."""
        c = self.config
        dev = self.pipeline.device
        rec = self.records
        batch = batch["index"]
        z = rec["noise"][batch.to(rec["noise"].device)].to(dev)
        emb = rec["prompt_embeds"][batch.to(rec["prompt_embeds"].device)].to(dev)
        prompts = [rec["prompts"][i] for i in batch.tolist()]
        x0 = self.pipeline.generate(z, emb)
        reward = self.reward(self.pipeline.decode(x0), prompts)
        terms = self.divergence_terms(x0, emb)
        loss = -c.reward_weight * reward.mean() + c.divergence_weight * terms["surrogate"].mean()
        self._steps_this_round += 1
        return loss, {"reward_at_gradient": reward.mean().item(), "surrogate": terms["surrogate"].mean().item(),
                      "score_divergence": terms["divergence"].mean().item()}

    def fake_score_loss(self, x0: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Denoising score matching of the fake-score UNet on detached generator samples x0."""
        x_t, t, eps = self._noise(x0.detach())
        return denoising_score_matching_loss(self._eps(self.fake_unet, x_t, t, emb, 1.0), eps)

    def extra_step(self, round_index: int) -> Dict[str, float]:
        """`fake_updates_per_step` fake-score updates per generator step, each on fresh samples of the updated generator."""
        if self.records is None:
            return {}
        c = self.config
        rec = self.records
        n = rec["noise"].shape[0]
        size = c.fake_batch_size or n
        updates = c.fake_updates_per_step * max(1, self._steps_this_round // c.gradient_accumulation)
        losses = []
        self.fake_unet.requires_grad_(True).train()
        try:
            for _ in range(updates):
                idx = torch.randint(0, n, (size,), generator=self.generator)
                emb = rec["prompt_embeds"][idx.to(rec["prompt_embeds"].device)].to(self.pipeline.device)
                z = torch.randn((size, *self.pipeline.latent_shape), generator=self.generator).to(self.pipeline.device)
                with torch.no_grad():
                    x0 = self.pipeline.generate(z.to(self.pipeline.latent_dtype), emb)
                loss = self.fake_score_loss(x0, emb)
                self.fake_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.fake_max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.fake_unet.parameters(), c.fake_max_grad_norm)
                self.fake_optimizer.step()
                losses.append(loss.item())
        finally:
            self.fake_optimizer.zero_grad(set_to_none=True)
            self.fake_unet.requires_grad_(False)
            self.records = None
        return {"fake_dsm_loss": sum(losses) / len(losses), "fake_updates": float(len(losses))}

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Fake-score weights and optimiser plus the method's RNG, so a resumed run continues the same alternation."""
        return {"fake_unet": {k: v.detach().cpu() for k, v in self.fake_unet.state_dict().items()},
                "fake_optimizer": self.fake_optimizer.state_dict(), "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.fake_unet.load_state_dict(state["fake_unet"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
