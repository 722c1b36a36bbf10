"""The training-loop settings every finetuner's config inherits (model, prompts, reward, sampling, optimiser)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from .config import ConfigBase, ConfigError, option


@dataclass
class TrainConfig(ConfigBase):
    """Loop settings shared by all methods. Method configs subclass it and add their own fields."""

    method: str = option("dpok", "Which finetuner runs: a name from genft.methods (e.g. 'dpok').")
    model: str = option("toyworld", "Base generator: 'toyworld' (the cached toy world, pretrained on first use), a hub id, or a local diffusers folder.")
    resolution: Optional[int] = option(None, "Image height = width in pixels for hub/folder models (e.g. 512 for SD3.5 or FLUX at half size); None: the model's default. Must be a multiple of the VAE's downsampling factor.")
    max_sequence_length: Optional[int] = option(None, "T5 tokens per prompt for SD3/FLUX (None: diffusers' default, 256 for SD3 and 512 for FLUX); shorter saves memory and time.")
    reward: Union[str, Dict[str, float]] = option("toy_oracle", "Reward to optimise: a registered name (see reward_models.available()), 'module:Class', or a mapping {name: weight} for a weighted sum whose parts are logged separately.")
    reward_options: Dict[str, Dict[str, Any]] = option({}, "Constructor arguments per reward name, e.g. {clip_score: {model: ViT-B-32, pretrained: /path/to/weights.bin, device: cuda}}.")
    eval_rewards: List[str] = option(["toy_oracle_accuracy"], "Held-out rewards measured at evaluation only, never optimised.")
    prompts: str = option("toyworld:train", "Training prompts: 'toyworld:train', 'toyworld:heldout', or a text file with one prompt per line.")
    eval_prompts: str = option("toyworld:heldout", "Evaluation prompts, same forms as `prompts`.")
    output_dir: str = option("genft_runs/run", "Folder for logs, evaluation samples and checkpoints (created).")
    seed: int = option(0, "Seed for prompt order, rollout noise and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "'auto' uses CUDA when available, else the CPU.")

    num_inference_steps: int = option(20, "Sampler steps per rollout (DDIM).")
    guidance_scale: float = option(3.0, "Classifier-free guidance scale for rollouts and evaluation (1 disables CFG).")
    eta: float = option(1.0, "DDIM η for rollouts; η > 0 is needed for a stochastic policy (1 = DDPM-like, the published setting).")

    num_rounds: int = option(20, "Sampling rounds: each samples a batch, scores it and runs the method's updates.")
    prompts_per_round: int = option(8, "Distinct prompts sampled per round.")
    samples_per_prompt: int = option(4, "Images per prompt per round (the group for per-prompt advantage normalisation).")
    rollout_chunk_size: int = option(0, "Roll out the round's batch in chunks of this many samples (0: all at once); bounds sampling memory.")
    async_reward: bool = option(False, "Score each rollout chunk on a background thread while the next chunk is sampled (needs rollout_chunk_size > 0 to overlap).")
    learning_rate: float = option(1e-5, "AdamW learning rate for the generator.")
    adam_beta1: float = option(0.9, "AdamW β1.")
    adam_beta2: float = option(0.999, "AdamW β2.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient-norm clip per optimiser step (0 disables).")

    eval_every: int = option(0, "Evaluate every N rounds (0: only before and after training).")
    eval_images_per_prompt: int = option(4, "Images per evaluation prompt; seeds are fixed so runs compare image for image.")
    eval_max_prompts: int = option(0, "Evaluate on at most this many eval prompts (0: all).")
    eval_eta: float = option(1.0, "DDIM η used for evaluation samples (with fixed seeds).")
    checkpoint_every: int = option(0, "Save a checkpoint every N rounds (0: only at the end).")
    resume_from: Optional[str] = option(None, "Checkpoint folder to resume from (weights, optimiser, RNG, round counter), or 'latest' for the newest complete one under output_dir/checkpoints.")
    progress: bool = option(True, "Show progress bars.")
    tracker: Literal["none", "csv", "tensorboard", "wandb"] = option("none", "Where round metrics also go, besides log.jsonl: 'none', 'csv' (output_dir/tracker.csv), 'tensorboard' (output_dir/tensorboard; needs the tensorboard package) or 'wandb' (needs wandb; never required).")

    finetune: Literal["full", "lora"] = option("full", "'full': train every weight of the generator; 'lora': train peft LoRA adapters only (saved in diffusers' format, loadable with load_lora_weights).")
    lora_rank: int = option(4, "LoRA rank r (finetune=lora). Published: 4 (DPOK, lr 1e-5), 32 (Flow-GRPO, lr 3e-4).")
    lora_alpha: float = option(4.0, "LoRA scale α; adapters are scaled by α/r (Flow-GRPO: α = 2r = 64).")
    lora_targets: Optional[List[str]] = option(None, "Module names LoRA adapts (finetune=lora); None: per family, the UNet's to_q/to_k/to_v/to_out.0, SD3/FLUX's joint-attention projections (see genft.lora.TARGETS).")
    ema_decay: float = option(0.0, "Decay of an EMA of the trained weights, used for evaluation and the exported LoRA (0: off; Flow-GRPO: 0.9). Warmed up as min(decay, (1+k)/(10+k)).")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "Autocast the generator's forward in bf16/fp16 (weights, step math and log-probs stay float32); fp16 adds loss scaling.")
    trajectory_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "dtype rollout latents are stored in; 'auto': bf16/fp16 under mixed_precision, else the generator's. Latents are cast before scoring so re-scoring reproduces the log-prob.")
    fsdp: bool = option(False, "Shard the generator's weights, gradients and optimiser state over the processes (PyTorch FSDP2, one unit per transformer/ResNet block); needs several processes (torchrun or accelerate launch). Full fine-tuning, fp32 or bf16; not with LoRA, EMA or fp16 yet.")
    gradient_checkpointing: bool = option(False, "Recompute the generator's activations in the backward pass (less memory, ~30% more compute).")
    attention_backend: Literal["auto", "xformers", "sdpa", "math"] = option("auto", "Attention kernel: 'sdpa' (PyTorch fused), 'math' (explicit softmax, reference), 'xformers' (CUDA + the xformers package), 'auto' (xformers on CUDA when installed, else sdpa).")
    cache_text_embeddings: bool = option(False, "Encode every training/eval prompt once and reuse the embeddings in rollouts (kept under output_dir/text_embeddings).")

    def validate(self) -> None:
        super().validate()
        positive = ["num_inference_steps", "num_rounds", "prompts_per_round", "samples_per_prompt", "eval_images_per_prompt"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ["eval_every", "checkpoint_every", "eval_max_prompts", "rollout_chunk_size"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0, e.g. 1e-5")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance_scale={self.guidance_scale} must be >= 1 (1 disables classifier-free guidance)")
        if self.eta < 0 or self.eval_eta < 0:
            raise ConfigError(f"eta={self.eta} and eval_eta={self.eval_eta} must be >= 0")
        for name in ["adam_beta1", "adam_beta2"]:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} and weight_decay={self.weight_decay} must be >= 0")
        for name in ("resolution", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer (or unset for the model's default)")
            if value is not None and self.model.startswith("toyworld"):
                raise ConfigError(f"{name}={value} applies to hub/folder models; model={self.model!r} is fixed "
                                  "(16x16 images, its own tokenizer): leave it unset")
        if not self.reward:
            raise ConfigError("reward is empty; name a reward, e.g. reward=jpeg_compressibility, or give {name: weight, ...}")
        named = set(self.reward) if isinstance(self.reward, dict) else {self.reward}
        unknown = sorted(set(self.reward_options) - named - set(self.eval_rewards))
        if unknown:
            raise ConfigError(f"reward_options names {unknown}, which are neither in reward nor eval_rewards ({sorted(named | set(self.eval_rewards))}); "
                              "fix the name or add the reward")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; give a folder for the run's outputs")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise ConfigError(f"lora_rank={self.lora_rank} must be >= 1 and lora_alpha={self.lora_alpha} > 0, e.g. lora_rank=4 lora_alpha=4")
        if self.lora_targets is not None and (self.finetune != "lora" or not self.lora_targets):
            raise ConfigError(f"lora_targets={self.lora_targets!r} needs finetune=lora and at least one module name (or leave it unset)")
        if self.fsdp:
            clashes = [(self.finetune == "lora", "finetune=lora (the adapters are small: use DDP)"),
                       (self.ema_decay > 0, "ema_decay > 0 (set ema_decay=0)"),
                       (self.mixed_precision == "fp16", "mixed_precision=fp16 (use bf16)")]
            for clash, fix in clashes:
                if clash:
                    raise ConfigError(f"fsdp=true does not support {fix}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1) (0 turns the EMA off; e.g. 0.9)")
        if self.attention_backend == "xformers" and self.device == "cpu":
            raise ConfigError("attention_backend='xformers' needs CUDA but device='cpu'; use attention_backend=sdpa (or auto)")

    @property
    def rollout_batch_size(self) -> int:
        return self.prompts_per_round * self.samples_per_prompt
