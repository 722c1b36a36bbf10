"""GARDO (He et al., arXiv 2512.24138): gated and adaptive KL with a diversity-aware advantage, over GRPO or DPOK.

Registered as two methods, `gardo_grpo` and `gardo_dpok`: each is its base method plus the flat GARDO
fields below (flat, like every genft config, so `key=value` overrides and strict checking work).
Every part switches off alone for ablations:

- `gated_kl`: the KL to the reference is averaged only over the most uncertain fraction p of the round's
  samples. Uncertainty is the disagreement between the proxy's ranking of the batch and the mean ranking
  of `aux_rewards` (see `genft.gardo.rank_uncertainty` for the sign); p adapts within bounds when
  `adaptive_kl_fraction`. Off: the base method's KL on every sample.
- `adaptive_reference`: the reference is reset to the current policy after a round in which an
  optimiser step's KL passed `reference_kl_threshold`, or every `reference_reset_every` rounds.
  Off: the frozen pretrained reference.
- `diversity_advantage`: A = (r − mean_g r)·(d/mean_g d) for above-mean samples (d: nearest-neighbour
  cosine distance within the prompt group in `diversity_features`), no std division, clipped to
  ±adv_clip_max. Off: the base method's advantage.

The math lives in `genft.gardo`; this module only wires it into the Method hooks (`collect`,
`sample_fields`, `kl_reduce`, `extra_step`). Not reproduced: the released code's per-step weighting of
the policy loss by σ_t/mean σ.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F

from pipelines import Trajectory

from ..config import ConfigError, option
from ..features import FeatureExtractor, load_features
from ..gardo import (AdaptiveFraction, ReferenceResetTrigger, diversity_advantages, nearest_neighbour_distance,
                     rank_uncertainty, uncertainty_gate)
from ..reference import AdapterReference, add_reference_adapter, copy_policy_adapter
from ..reward_setup import build_reward
from .dpok import DPOK, DPOKConfig
from .grpo import GRPO, GRPOConfig


@dataclass
class GARDOOptions:
    """GARDO's fields, shared by `gardo_grpo` and `gardo_dpok` (defaults from `tinnerhrhe/GARDO` config/gardo.py and its SD3 script)."""

    gated_kl: bool = option(True, "Apply the KL (weight kl_weight) only to the most uncertain fraction of samples (GARDO's gate); false: to all samples.")
    aux_rewards: List[str] = option([], "Auxiliary rewards whose rankings the proxy's ranking is checked against (the paper: aesthetic and image_reward). Names, 'module:Class' paths. Never a held-out eval reward.")
    aux_reward_options: Dict[str, Dict[str, Any]] = option({}, "Constructor arguments per auxiliary reward, e.g. {'genft.toyworld.proxy:ToyProxyCLIPScore': {path: /my/proxy}}.")
    uncertainty_sign: Literal["proxy_overrates", "reference_code"] = option(
        "proxy_overrates", "'proxy_overrates': uncertain = the proxy ranks the sample above the auxiliaries' mean rank (the reward-hacking story of the paper); "
        "'reference_code': the released code's rank_main − mean rank_aux with descending ranks, which flags the opposite.")
    kl_fraction: float = option(0.1, "Initial fraction p of samples whose KL is penalised.")
    kl_fraction_min: float = option(0.02, "Lower bound of the adaptive p.")
    kl_fraction_max: float = option(0.2, "Upper bound of the adaptive p.")
    adaptive_kl_fraction: bool = option(True, "Adapt p: ×(1+rate) when the round's mean positive uncertainty tops the last `window` rounds, ×(1−rate) below them.")
    kl_fraction_rate: float = option(0.1, "Multiplicative step of the adaptive p.")
    kl_fraction_window: int = option(20, "Rounds of uncertainty history the adaptive p compares against.")
    adaptive_reference: bool = option(True, "Reset the KL reference to the current policy when triggered: a full-weight copy, or with finetune=lora a second, frozen adapter.")
    reference_kl_threshold: float = option(3e-4, "Reset after a round in which an optimiser step's mean (gated) KL exceeded this (code: 3e-4, 'set per task'); 0 disables.")
    reference_reset_every: int = option(15, "Also reset every N rounds since the last reset (code: 15 epochs); 0 disables.")
    diversity_advantage: bool = option(True, "Multiply above-mean advantages by the sample's nearest-neighbour distance over its group's mean distance (no std division).")
    diversity_features: str = option("toy_proxy_clip", "Image features for the diversity distance: 'toy_proxy_clip' (the toy proxy CLIP's image tower), a genft.features name ('dino' for real models, as the paper's DINOv3; 'clip'; 'pixels') or 'module:Class'.")
    diversity_feature_options: Dict[str, Any] = option({}, "Constructor arguments of the feature extractor.")
    diversity_std: bool = option(False, "Divide the diversity-aware advantage by the batch reward std (Flow-GRPO's scale); GARDO does not.")

    def validate(self) -> None:
        super().validate()  # the base method's config (cooperative: GARDO configs list GARDOOptions first)
        gate = self.gated_kl and self.kl_weight > 0
        if getattr(self, "fsdp", False) and self.adaptive_reference and self.kl_weight > 0:
            raise ConfigError("adaptive_reference=true with fsdp=true is not supported yet (the reset copies a sharded network "
                              "and its checkpoint would need gathering); set adaptive_reference=false or use DDP")
        if gate and not self.aux_rewards:
            raise ConfigError("gated_kl=True needs aux_rewards to estimate uncertainty, e.g. aux_rewards=[aesthetic,image_reward] "
                              "(the paper's); or set gated_kl=false")
        held_out = sorted(set(self.aux_rewards) & set(self.eval_rewards))
        if held_out:
            raise ConfigError(f"aux_rewards {held_out} are also held-out eval_rewards; a held-out reward must not steer training. "
                              "Pick other auxiliaries or drop them from eval_rewards")
        main = set(self.reward) if isinstance(self.reward, dict) else {self.reward}
        if main & set(self.aux_rewards):
            raise ConfigError(f"aux_rewards {sorted(main & set(self.aux_rewards))} include the optimised reward; auxiliaries must differ from it")
        unknown = sorted(set(self.aux_reward_options) - set(self.aux_rewards))
        if unknown:
            raise ConfigError(f"aux_reward_options names {unknown}, which are not in aux_rewards {self.aux_rewards}")
        if not 0 < self.kl_fraction_min <= self.kl_fraction <= self.kl_fraction_max <= 1:
            raise ConfigError(f"need 0 < kl_fraction_min ({self.kl_fraction_min}) <= kl_fraction ({self.kl_fraction}) <= "
                              f"kl_fraction_max ({self.kl_fraction_max}) <= 1")
        if not 0 <= self.kl_fraction_rate < 1 or self.kl_fraction_window < 1:
            raise ConfigError(f"kl_fraction_rate={self.kl_fraction_rate} must be in [0, 1) and kl_fraction_window={self.kl_fraction_window} >= 1")
        if self.reference_kl_threshold < 0 or self.reference_reset_every < 0:
            raise ConfigError(f"reference_kl_threshold={self.reference_kl_threshold} and reference_reset_every="
                              f"{self.reference_reset_every} must be >= 0 (0 disables that trigger)")
        if self.diversity_advantage and self.samples_per_prompt < 2:
            raise ConfigError(f"diversity_advantage needs samples_per_prompt >= 2 (nearest neighbours within a prompt's group), "
                              f"got {self.samples_per_prompt}")


@dataclass
class GARDOGRPOConfig(GARDOOptions, GRPOConfig):
    """GRPO plus GARDO (the paper's main setting, over Flow-GRPO)."""

    method: str = option("gardo_grpo", "Which finetuner runs: a name from genft.methods.")


@dataclass
class GARDODPOKConfig(GARDOOptions, DPOKConfig):
    """DPOK plus GARDO (the DPOK replay buffer stores each transition's KL gate)."""

    method: str = option("gardo_dpok", "Which finetuner runs: a name from genft.methods.")


class ToyProxyCLIPFeatures(FeatureExtractor):
    """Unit-norm image embeddings of the toy world's proxy CLIP (`path`, default: the cached proxy)."""

    name = "toy_proxy_clip"

    def __init__(self, path: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)
        from ..toyworld.proxy import load_or_train_proxy, load_proxy

        folder = Path(path).expanduser() if path is not None else load_or_train_proxy(progress=False)
        self.model, _ = load_proxy(folder)
        self.model.to(self.device)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        from ..toyworld.proxy import normalize_images

        return F.normalize(self.model.encode_image(normalize_images(images.float())), dim=-1)


def build_features(spec: str, options: Dict[str, Any]) -> FeatureExtractor:
    """The diversity feature extractor: 'toy_proxy_clip' here, anything else through `genft.features.load_features`."""
    if spec == "toy_proxy_clip":
        return ToyProxyCLIPFeatures(**options)
    return load_features(spec, **options)


class GARDOMixin:
    """GARDO's hooks; listed before a base Method (GRPO, DPOK) that offers `sample_fields` and `kl_reduce`."""

    def _setup_gardo(self) -> None:
        c = self.config
        self.gates_kl = c.gated_kl and c.kl_weight > 0
        rate = c.kl_fraction_rate if c.adaptive_kl_fraction else 0.0
        self.fraction = AdaptiveFraction(c.kl_fraction, c.kl_fraction_min, c.kl_fraction_max, rate, c.kl_fraction_window)
        self.trigger = ReferenceResetTrigger(c.reference_kl_threshold, c.reference_reset_every) if c.adaptive_reference and c.kl_weight > 0 else None
        if self.trigger is not None and isinstance(self.reference_unet, AdapterReference):
            add_reference_adapter(self.reference_unet)  # LoRA: the moving reference is a second, frozen adapter
        device = self.pipeline.device
        self.aux = {name: build_reward(name, c.aux_reward_options).to(device) for name in c.aux_rewards} if self.gates_kl else {}
        self.features = build_features(c.diversity_features, c.diversity_feature_options) if c.diversity_advantage else None
        self._gate: Optional[torch.Tensor] = None
        self._kl_terms: List[float] = []
        self._round_metrics: Dict[str, float] = {}

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        c = self.config
        prompts, images = trajectory.prompts, trajectory.images
        metrics: Dict[str, float] = {}
        if self.features is not None:
            d = nearest_neighbour_distance(self.features(images), prompts)
            std = rewards.float().std(unbiased=False) if c.diversity_std else None
            advantages = diversity_advantages(rewards, prompts, d, c.adv_clip_max, std).to(advantages.device)
            metrics["nn_distance"] = d.mean().item()
        gate = torch.ones(trajectory.batch_size)
        if self.gates_kl:
            with torch.no_grad():
                aux = [r(images, prompts).float().cpu() for r in self.aux.values()]
            u = rank_uncertainty(rewards.float().cpu(), aux, c.uncertainty_sign)
            p = self.fraction.update(u)
            gate = uncertainty_gate(u, p).float()
            metrics.update(kl_fraction=p, gated_samples=gate.sum().item())
        self._gate = gate
        self._round_metrics = metrics
        super().collect(trajectory, advantages, rewards)

    def sample_fields(self, trajectory: Trajectory, rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {**super().sample_fields(trajectory, rewards), "kl_gate": self._gate}

    def kl_reduce(self, kl: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """Mean KL over the gated samples of the minibatch (0 when none is gated, as in the code), or over all."""
        if self.gates_kl:
            g = batch["kl_gate"].to(kl.device).float()
            term = (kl * g).sum() / g.sum().clamp(min=1.0)
        else:
            term = kl.mean()
        self._kl_terms.append(term.item())
        return term

    def reset_reference(self) -> None:
        """Reference := the current policy: its full weights, or with LoRA its adapter into the reference adapter
        (the released code's "old" adapter)."""
        if isinstance(self.reference_unet, AdapterReference):
            copy_policy_adapter(self.reference_unet.module)
            return
        policy = getattr(self.pipeline.unet, "module", self.pipeline.unet)
        self.reference_unet.load_state_dict(policy.state_dict())

    def extra_step(self, round_index: int) -> Dict[str, float]:
        out = dict(super().extra_step(round_index))
        if self.trigger is not None:
            n = self.gradient_accumulation_steps
            terms = self._kl_terms
            for i in range(0, len(terms), n):
                window = terms[i:i + n]
                self.trigger.observe(sum(window) / len(window))
            done = round_index + 1
            reset = self.trigger.should_reset(done)
            if reset:
                self.reset_reference()
                self.trigger.mark_reset(done)
            out.update(reference_reset=float(reset), reference_resets=float(self.trigger.resets))
        self._kl_terms = []
        out.update(self._round_metrics)
        return out

    def state_dict(self) -> Dict[str, Any]:
        gardo: Dict[str, Any] = {"fraction": self.fraction.state_dict()}
        if self.trigger is not None:
            gardo["trigger"] = self.trigger.state_dict()
        if self.trigger is not None and not isinstance(self.reference_unet, AdapterReference):  # an adapter is in the network's weights
            gardo["reference"] = {k: v.detach().cpu().clone() for k, v in self.reference_unet.state_dict().items()}
        return {**super().state_dict(), "gardo": gardo}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        gardo = state.pop("gardo")
        self.fraction.load_state_dict(gardo["fraction"])
        if self.trigger is not None:
            self.trigger.load_state_dict(gardo["trigger"])
        if "reference" in gardo:
            self.reference_unet.load_state_dict(gardo["reference"])
        super().load_state_dict(state)


class GARDOGRPO(GARDOMixin, GRPO):
    """GARDO over Flow-GRPO-style GRPO (`method: gardo_grpo`)."""

    name = "gardo_grpo"
    config_class = GARDOGRPOConfig

    def __init__(self, config: GARDOGRPOConfig, pipeline, reference_unet: torch.nn.Module):
        GRPO.__init__(self, config, pipeline, reference_unet)
        self._setup_gardo()


class GARDODPOK(GARDOMixin, DPOK):
    """GARDO over DPOK (`method: gardo_dpok`)."""

    name = "gardo_dpok"
    config_class = GARDODPOKConfig

    def __init__(self, config: GARDODPOKConfig, pipeline, reference_unet: torch.nn.Module):
        DPOK.__init__(self, config, pipeline, reference_unet)
        self._setup_gardo()
