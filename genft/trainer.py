"""The one training loop: rollout → reward → advantages → method updates → evaluation → checkpoint.

Methods plug in through `genft.methods.Method` hooks; they never copy this loop. Every input is
resolved and checked (config, prompts, rewards) before a model is loaded or a sample drawn.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from pipelines import Trajectory, resolve_attention_backend, set_attention_backend
from reward_models import RewardError, RewardModel, WeightedSum
from reward_models.combine import AsyncScorer, score_with_components

from ._atomic import atomic_write_text
from .checkpoint import (capture_rng_state, latest_checkpoint, load_checkpoint, read_trainer_state, restore_rng_state,
                         save_checkpoint)
from .distributed import (SilentLog, any_process, check_data_parallel, check_divisible, gather_tensor, gather_trajectory,
                          mean_over_processes, shard_minibatch, shard_span)
from .evaluation import evaluate_pipeline
from .ema import ema_weights, make_ema
from .lora import apply_lora, has_lora, save_lora
from .reference import make_reference
from .sharding import full, full_model_state, full_optimizer_state, local, shard_network
from . import zero
from .precision import LossScaler, autocast_forward, storage_dtype
from .text_cache import TextEmbeddingCache
from .methods import get_method
from .models import check_method_fits_model, load_pipeline, resolve_device
from .prompts import load_prompts
from .reward_setup import build_eval_rewards, build_reward
from .tracking import RunLog, check_tracker, make_tracker
from .config import ConfigError
from .train_config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates)."""


def _round_seed(seed: int, round_index: int, i: int) -> int:
    return (seed * 1_000_003 + round_index * 10_007 + i) % (2**63 - 1)


class Trainer:
    """Fine-tunes `pipeline.unet` with the method named by `config.method`.

    Anything left as None is built from the config: the pipeline (`config.model`), the reward,
    the held-out rewards and the prompt sets. Pass objects to use your own.
    """

    def __init__(
        self,
        config: TrainConfig,
        pipeline=None,
        reward: Union[None, str, RewardModel] = None,
        eval_rewards: Optional[Dict[str, RewardModel]] = None,
        prompts: Optional[Sequence[str]] = None,
        eval_prompts: Optional[Sequence[str]] = None,
        accelerator=None,
    ):
        method_cls = get_method(config.method)
        if not isinstance(config, method_cls.config_class):
            raise TypeError(f"method {config.method!r} needs a {method_cls.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        # Cheap checks and loads first: nothing below samples or trains.
        self.prompts = list(prompts) if prompts is not None else load_prompts(config.prompts, "prompts")
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else load_prompts(config.eval_prompts, "eval_prompts")
        if config.eval_max_prompts:
            self.eval_prompts = self.eval_prompts[: config.eval_max_prompts]
        if not self.prompts or not self.eval_prompts:
            raise ValueError("prompts and eval_prompts must each hold at least one prompt")
        if pipeline is None:
            check_method_fits_model(method_cls, config.model)
        check_tracker(config.tracker)
        self.device = resolve_device(config.device)
        try:  # e.g. xformers asked for without CUDA or without the package: refused before any model loads
            resolve_attention_backend(config.attention_backend, self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        try:
            self.reward = build_reward(reward if reward is not None else config.reward, config.reward_options,
                                       differentiable=method_cls.needs_reward_gradient)
        except ValueError as e:
            if method_cls.needs_reward_gradient and "differentiable" in str(e):
                raise ConfigError(f"method={config.method!r} back-propagates through the reward, so reward={config.reward!r} "
                                  f"must have a differentiable mode: {e}") from e
            raise
        if method_cls.needs_reward_gradient and not self.reward.differentiable:
            raise ConfigError(f"method={config.method!r} back-propagates through the reward, but the reward instance "
                              f"{self.reward.name!r} was built with differentiable=False; build it with differentiable=True")
        if eval_rewards is None:
            eval_rewards = build_eval_rewards(config.eval_rewards, config.reward_options)
        parts = dict(self.reward.parts.items()) if isinstance(self.reward, WeightedSum) else {}
        self.eval_rewards = {self.reward.name: self.reward, **parts, **eval_rewards}
        for r in self.eval_rewards.values():
            r.to(self.device)
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = zero.make_accelerator(self.device) if zero.requested() else Accelerator(cpu=self.device.type == "cpu")
        self.accelerator = accelerator
        check_data_parallel(accelerator)
        self.deepspeed = zero.is_deepspeed(accelerator)
        if self.deepspeed:
            zero.check_config(accelerator)
            if config.fsdp:
                raise ConfigError("fsdp=true and a DeepSpeed accelerate config both shard: pick one (fsdp=false, or the "
                                  "plain multi-process config scripts/recipes/accelerate/fsdp.yaml)")
        if config.fsdp and accelerator.num_processes < 2:
            raise ConfigError("fsdp=true shards the generator over processes but this run has one; launch several "
                              "(torchrun --nproc_per_node N -m genft.cli train ..., or accelerate launch with "
                              "scripts/recipes/accelerate/fsdp.yaml) or set fsdp=false")
        if accelerator.num_processes > 1:  # one device per process, and a round that splits evenly (genft.distributed)
            check_divisible("prompts_per_round*samples_per_prompt", config.rollout_batch_size, accelerator.num_processes)
            for name in ("p_batch_size", "train_batch_size"):  # the methods' minibatch sizes, each sliced over processes
                if hasattr(config, name):
                    check_divisible(name, getattr(config, name), accelerator.num_processes)
            if self.device.type == "cuda":
                self.device = accelerator.device
                for r in self.eval_rewards.values():
                    r.to(self.device)

        self.pipeline = pipeline if pipeline is not None else load_pipeline(config.model, self.device, config.progress,
                                                                                config.resolution, config.max_sequence_length)
        self.pipeline.to(self.device)
        for field_name, prompt_set in (("prompts", self.prompts), ("eval_prompts", self.eval_prompts)):
            try:  # every prompt, before the first sample: a bad one must not stop the run hours in
                self.pipeline.check_prompts(prompt_set, field_name=f"{field_name}: prompt", allow_empty=False)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        self.pipeline.text_encoder.requires_grad_(False)
        if self.pipeline.vae is not None:
            self.pipeline.vae.requires_grad_(False)
        self.attention_backend = set_attention_backend(self.pipeline.unet, config.attention_backend)  # the reference copies it
        # Full fine-tuning: a frozen copy taken before any training state is added. LoRA: a view of the
        # policy with its adapters off (genft.reference), made once the adapters exist. None: unused (DI*).
        self.reference_unet = None
        if method_cls.uses_reference and config.finetune != "lora":
            self.reference_unet = make_reference(self.pipeline.unet, lora=False)
        self.pipeline.unet.requires_grad_(True).train()
        self._setup_efficiency()
        if method_cls.uses_reference and config.finetune == "lora":
            self.reference_unet = make_reference(self.pipeline.unet, lora=True)
        self.fsdp_units = 0
        if config.fsdp:  # after every change to the network's modules; parameters become DTensors here (genft.sharding)
            self.fsdp_units = shard_network(self.pipeline.unet)
            if self.reference_unet is not None:
                shard_network(self.reference_unet)
            self.trainable = [p for p in self.pipeline.unet.parameters() if p.requires_grad]
        self.method = method_cls(config, self.pipeline, self.reference_unet)
        self.method.attach(reward=self.reward)  # first-order methods (Adjoint Matching) differentiate it themselves
        self.optimizer = torch.optim.AdamW(
            [p for p in self.pipeline.unet.parameters() if p.requires_grad], lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
        )
        # The pipeline keeps the bare UNet: it reads .config/.dtype, and sampling/evaluation need no collectives.
        # The prepared model (DDP-wrapped with several processes) stands in only for the loss passes (`_training_model`).
        if config.fsdp:  # FSDP averages gradients itself (reduce-scatter): no DDP wrapper
            self.model, self.optimizer = self.pipeline.unet, self.accelerator.prepare(self.optimizer)
        else:
            if self.deepspeed:  # the engine accumulates and clips by genft's settings (genft.zero)
                zero.configure(self.accelerator, self.method.gradient_accumulation_steps, config.max_grad_norm)
            self.model, self.optimizer = self.accelerator.prepare(self.pipeline.unet, self.optimizer)
        self.out_dir = Path(config.output_dir)
        # One tracker run per job, not per process (wandb would otherwise open one run per GPU).
        tracker = make_tracker(config.tracker, self.out_dir, config.to_dict()) if self.accelerator.is_main_process else None
        self.log = RunLog(self.out_dir, tracker=tracker) if self.accelerator.is_main_process else SilentLog()
        self.round = 0
        self.generator = torch.Generator().manual_seed(config.seed)  # identical on every process: minibatch draws agree
        self.optimizer_steps = 0
        self.consecutive_skips = 0
        self.max_consecutive_skips = 5
        self.stop_requested = False
        self.last_reward_parts: Dict[str, float] = {}
        if config.resume_from == "latest":
            found = latest_checkpoint(self.out_dir / "checkpoints")
            if found is not None:
                self._resume(found)
        elif config.resume_from:
            self._resume(Path(config.resume_from))

    def _setup_efficiency(self) -> None:
        """LoRA or full fine-tuning, gradient checkpointing, mixed precision, EMA and the text cache (config fields of those names)."""
        c, unet = self.config, self.pipeline.unet
        if c.finetune == "lora":
            apply_lora(unet, c.lora_rank, c.lora_alpha, c.lora_targets)
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        if c.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        for net in (unet, self.reference_unet):  # only the forward is autocast: step math and log-probs stay float32
            if net is not None:  # a LoRA reference is made after this and calls the (autocast) policy itself
                autocast_forward(net, c.mixed_precision, self.device)
        dtype = storage_dtype(c.mixed_precision, c.trajectory_dtype)
        if dtype is not None:
            self.pipeline.storage_dtype = dtype
        self.scaler = LossScaler(c.mixed_precision, self.device)
        self.ema = make_ema(self.trainable, c.ema_decay)
        self.text_cache = None
        if c.cache_text_embeddings:
            self.text_cache = TextEmbeddingCache.for_pipeline(self.pipeline, Path(c.output_dir) / "text_embeddings")
            if self.text_cache.precompute([*self.prompts, *self.eval_prompts, ""]) and self.accelerator.is_main_process:
                self.text_cache.save()
            self.text_cache.install(self.pipeline)

    # ----- pieces of a round ------------------------------------------------------------------
    def round_prompts(self, round_index: int) -> List[str]:
        """The round's prompts, each repeated `samples_per_prompt` times (a group), chosen by seed and round."""
        c = self.config
        rng = random.Random(_round_seed(c.seed, round_index, 0))
        k = c.prompts_per_round
        chosen = rng.sample(self.prompts, k) if k <= len(self.prompts) else [rng.choice(self.prompts) for _ in range(k)]
        return [p for p in chosen for _ in range(c.samples_per_prompt)]

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """Rewards for a batch (parts of a weighted sum kept in `last_reward_parts` for the log).

        A reward failure is reported with the batch's prompts.
        """
        try:
            total, parts = score_with_components(self.reward, images, prompts)
            self.last_reward_parts = {k: v.mean().item() for k, v in parts.items()} if len(parts) > 1 else {}
            return total.to(self.device)
        except Exception as e:
            shown = prompts[:4] + (["..."] if len(prompts) > 4 else [])
            raise RewardError(f"reward {self.reward.name!r} failed on batch prompts {shown}: {e}") from e

    def sample_and_score(self, prompts: List[str], generators: List[torch.Generator]):
        """Roll out the round's batch (in chunks if configured) and score it; returns the global round.

        With `async_reward`, chunk k is scored on a background thread while chunk k+1 is sampled.
        Per-sample generators make the result identical whatever the chunking. With several processes
        each rolls out and scores its contiguous share; the trajectory and rewards are then gathered in
        rank order, so every process returns the same global round a single process would (genft.distributed).
        """
        c = self.config
        acc = self.accelerator
        full = prompts
        a0, b0 = shard_span(len(prompts), acc.process_index, acc.num_processes)
        prompts, generators = prompts[a0:b0], generators[a0:b0]
        step = c.rollout_chunk_size or len(prompts)
        spans = [(i, min(i + step, len(prompts))) for i in range(0, len(prompts), step)]
        self.pipeline.unet.eval()
        parts, futures = [], []
        scorer = AsyncScorer(self.reward) if c.async_reward else None
        try:
            for a, b in spans:
                part = self.pipeline.rollout(prompts[a:b], generator=generators[a:b], num_inference_steps=c.num_inference_steps,
                                             guidance_scale=c.guidance_scale, **self.method.rollout_kwargs())
                parts.append(part)
                if scorer is not None:
                    futures.append(scorer.submit(part.images, prompts[a:b]))
            traj = parts[0] if len(parts) == 1 else Trajectory.cat(parts)
            if scorer is None:
                rewards = self.score(traj.images, prompts)
            else:
                rewards = self._gather_scores(futures, spans, prompts)
        finally:
            if scorer is not None:
                scorer.close()
            self.pipeline.unet.train()
        if acc.num_processes > 1:
            traj, rewards = gather_trajectory(acc, traj), gather_tensor(acc, rewards)
            self.last_reward_parts = mean_over_processes(acc, self.last_reward_parts)
            if traj.prompts != list(full):
                raise RuntimeError("processes disagree on the round's prompts; every process needs the same seed and prompts")
        return traj, rewards

    def _gather_scores(self, futures, spans, prompts: List[str]) -> torch.Tensor:
        totals, sums, counts = [], {}, 0
        for fut, (a, b) in zip(futures, spans):
            try:
                total, parts = fut.result()
            except Exception as e:
                shown = prompts[a:b][:4] + (["..."] if b - a > 4 else [])
                raise RewardError(f"reward {self.reward.name!r} failed on batch prompts {shown}: {e}") from e
            totals.append(total.to(self.device))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.sum().item()
            counts += b - a
        self.last_reward_parts = {k: v / counts for k, v in sums.items()} if len(sums) > 1 else {}
        return torch.cat(totals)

    def update(self, round_index: int) -> Dict[str, float]:
        """Run the method's minibatches; one optimiser step per `gradient_accumulation_steps` of them."""
        accum = self.method.gradient_accumulation_steps
        sums: Dict[str, float] = {}
        count, steps, skipped, window_ok = 0, 0, 0, True
        unet = self.pipeline.unet
        acc = self.accelerator
        multi = acc.num_processes > 1
        for i, batch in enumerate(self.method.minibatches(self.generator)):
            if multi:  # the same minibatch on every process; each trains on its slice, DDP averages (genft.distributed)
                batch = shard_minibatch(batch, acc.process_index, acc.num_processes)
            boundary = (i + 1) % accum == 0
            with self._training_model(sync=boundary):
                loss, metrics = self.method.loss(batch, round_index)
                if self.deepspeed:
                    self._deepspeed_backward(loss, boundary, round_index)
                elif torch.isfinite(loss) or (multi and loss.requires_grad):
                    # Several processes: each must join DDP's all-reduce; a window non-finite anywhere is skipped everywhere.
                    acc.backward(self.scaler.scale(loss / accum))
            window_ok = window_ok and bool(torch.isfinite(loss))
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if boundary and self.deepspeed:
                self.model.step()  # DeepSpeed clips (max_grad_norm), steps AdamW on its partition and zeroes the gradients
                norm = self.model.get_global_grad_norm()
                if self.config.max_grad_norm > 0 and norm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm) * accum
                if self.ema is not None:
                    self.ema.step(self.trainable)
                steps += 1
                self.optimizer_steps += 1
            elif boundary:
                self.scaler.unscale(self.optimizer)  # fp16: true gradients before the checks and the clip
                grads_ok = all(torch.isfinite(local(p.grad)).all() for p in unet.parameters() if p.grad is not None)
                if multi:
                    window_ok = not any_process(acc, not window_ok)
                    if self.config.fsdp:  # each process checked only its own shard of the gradients
                        grads_ok = not any_process(acc, not grads_ok)
                if window_ok and grads_ok:
                    if self.config.max_grad_norm > 0:
                        norm = self.accelerator.clip_grad_norm_(unet.parameters(), self.config.max_grad_norm)
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(full(norm)) * accum
                    self.scaler.step(self.optimizer)
                    if self.ema is not None:
                        self.ema.step(self.trainable)
                    steps += 1
                    self.optimizer_steps += 1
                    self.consecutive_skips = 0
                else:
                    skipped += 1
                    # fp16: an overflow at a high loss scale is expected; the scaler lowers the scale and the run goes on.
                    overflow = window_ok and self.scaler.enabled and self.scaler.scale_value >= 1.0
                    self.consecutive_skips += 0 if overflow else 1
                    self.log.log({"round": round_index, "event": "skipped_update",
                                  "reason": "fp16 loss-scale overflow" if overflow else "non-finite loss or gradient"})
                    if self.consecutive_skips >= self.max_consecutive_skips:
                        raise TrainingError(
                            f"{self.consecutive_skips} consecutive updates had a non-finite loss or gradient (round {round_index}); "
                            "lower learning_rate or reward_weight, and check the reward for NaNs"
                        )
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                window_ok = True
        out = mean_over_processes(acc, {k: v / max(count, 1) for k, v in sums.items()})
        out.update(optimizer_steps=steps, skipped_updates=skipped)
        return out

    def _deepspeed_backward(self, loss: torch.Tensor, boundary: bool, round_index: int) -> None:
        """Backward through the DeepSpeed engine, which divides by its accumulation steps and marks the window's end.

        DeepSpeed has no skipped step in float32, so a non-finite loss on any process stops the run before its
        backward, with the weights still finite.
        """
        if any_process(self.accelerator, not bool(torch.isfinite(loss))):
            raise TrainingError(f"non-finite loss in round {round_index} under DeepSpeed, which cannot skip an update; "
                                "lower learning_rate or reward_weight, and check the reward for NaNs")
        self.model.set_gradient_accumulation_boundary(boundary)
        self.model.backward(loss)

    @contextlib.contextmanager
    def _training_model(self, sync: bool = True):
        """Route the method's forward passes through the prepared model (DDP with several processes).

        Without `sync` (a micro-batch inside a gradient-accumulation window) DDP skips its all-reduce; the
        window's last micro-batch averages the summed gradients once.
        """
        if self.model is self.pipeline.unet:
            yield
            return
        bare = self.pipeline.unet
        self.pipeline.unet = self.model
        try:
            with contextlib.ExitStack() as stack:
                if not sync and not self.deepspeed:  # DeepSpeed marks the window itself (_deepspeed_backward)
                    stack.enter_context(self.accelerator.no_sync(self.model))
                yield
        finally:
            self.pipeline.unet = bare

    def evaluate(self, tag: str) -> Dict:
        """Fixed-seed samples of the eval prompts, scored by every reward; saved under evals/<tag>/.

        With several processes the main one evaluates (the bare UNet, no collectives) and sends the result to the others;
        under FSDP every forward is a collective, so every process evaluates and only the main one writes.
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._evaluate_here(tag)
        if self.config.fsdp:
            return self._evaluate_here(tag, write=acc.is_main_process)
        from accelerate.utils import broadcast_object_list

        result = [self._evaluate_here(tag) if acc.is_main_process else None]
        broadcast_object_list(result, from_process=0)
        return result[0]

    def _evaluate_here(self, tag: str, write: bool = True) -> Dict:
        c = self.config
        unet = self.pipeline.unet
        was_training = unet.training
        unet.eval()
        try:
            with ema_weights(self.ema, self.trainable):  # evaluate the averaged weights when the EMA is on
                result = evaluate_pipeline(
                    self.pipeline, self.eval_prompts, self.eval_rewards, images_per_prompt=c.eval_images_per_prompt,
                    seed=c.seed + 12345, num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                    eta=c.eval_eta, out_dir=self.out_dir / "evals" / tag if write else None,
                )
        finally:
            unet.train(was_training)
        self.log.log({"round": self.round, "event": "eval", "tag": tag,
                      **{f"eval/{k}": v["mean"] for k, v in result["metrics"].items()}})
        return result

    # ----- the loop ---------------------------------------------------------------------------
    def train(self) -> Dict:
        """Run all rounds; returns the evaluation before and after and the path of the run folder."""
        c = self.config
        acc = self.accelerator
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.json", json.dumps(c.to_dict(), indent=1))
        before = self.evaluate("before") if self.round == 0 else None
        bar = tqdm(range(self.round, c.num_rounds), desc=f"{c.method} rounds", disable=not c.progress or not acc.is_main_process,
                   initial=self.round, total=c.num_rounds)
        for r in bar:
            t0 = time.time()
            prompts = self.round_prompts(r)
            gens = [torch.Generator(device=self.device).manual_seed(_round_seed(c.seed, r, i + 1)) for i in range(len(prompts))]
            traj, rewards = self.sample_and_score(prompts, gens)
            advantages = self.method.advantages(rewards, prompts)
            self.method.collect(traj, advantages, rewards)
            t1 = time.time()
            metrics = self.update(r)
            metrics.update(self.method.extra_step(r))
            self.round = r + 1
            record = {"round": self.round, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                      **{f"reward/{k}": v for k, v in self.last_reward_parts.items()},
                      "rollout_s": t1 - t0, "update_s": time.time() - t1, **metrics}
            self.log.log(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.2e}")
            if c.eval_every and self.round % c.eval_every == 0 and self.round < c.num_rounds:
                self.evaluate(f"round_{self.round:05d}")
            self.stop_requested = any_process(acc, self.stop_requested)  # a signal on any process stops all of them together
            if self.stop_requested:
                path = self.save(self.out_dir / "checkpoints" / f"round_{self.round:05d}")
                self.log.log({"round": self.round, "event": "interrupted", "checkpoint": str(path)})
                self.log.close()
                bar.close()
                return {"before": before, "after": None, "output_dir": str(self.out_dir), "interrupted": True,
                        "checkpoint": str(path)}
            if c.checkpoint_every and self.round % c.checkpoint_every == 0:
                self.save(self.out_dir / "checkpoints" / f"round_{self.round:05d}")
        after = self.evaluate("after")
        self.save(self.out_dir / "checkpoints" / "final")
        self.log.to_csv()
        self.log.close()
        return {"before": before, "after": after, "output_dir": str(self.out_dir)}

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and return after the current round (the CLI calls this on SIGINT/SIGTERM)."""
        self.stop_requested = True

    # ----- checkpoints ------------------------------------------------------------------------
    def _checkpoint_states(self) -> Dict[str, object]:
        """Stateful helpers saved beside the weights (anything with state_dict/load_state_dict): EMA, LR scheduler."""
        states = {name: getattr(self, name) for name in ("ema", "lr_scheduler") if getattr(self, name, None) is not None}
        if self.scaler.enabled:  # fp16 loss scale: resuming at the default scale would replay overflow skips
            states["loss_scaler"] = self.scaler
        return states

    def save(self, path: Path) -> Path:
        """Write a checkpoint (main process; every process's RNG states go in it); all processes return once it is on disk."""
        acc = self.accelerator
        unet = acc.unwrap_model(self.pipeline.unet)
        state = {"round": self.round, "optimizer_steps": self.optimizer_steps, "num_processes": acc.num_processes,
                 "generator": self.generator.get_state().tolist(), "config": self.config.to_dict()}
        rng = [capture_rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        model_state = optimizer_state = None
        if self.config.fsdp:  # collectives: every process gathers, the main one writes
            model_state = full_model_state(unet)
            optimizer_state = full_optimizer_state(unet, getattr(self.optimizer, "optimizer", self.optimizer))
            state.update(optimizer_format="by_name", fsdp_units=self.fsdp_units,
                         local_parameter_bytes=sum(local(p).numel() * p.element_size() for p in unet.parameters()))
        writers = {}
        if self.deepspeed:  # every process writes its optimiser partition; the main one moves them into the checkpoint
            staging = path.parent / f".{path.name}.zero-staging"
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            acc.wait_for_everyone()
            zero.write_optimizer_partition(self.model, staging, acc.process_index)
            acc.wait_for_everyone()
            state["optimizer_format"] = "deepspeed_zero"
            optimizer_state = {"format": "deepspeed_zero", "folder": zero.ZERO_DIR, "num_processes": acc.num_processes}

            def move_partitions(folder: Path) -> None:
                for f in sorted(staging.iterdir()):
                    os.replace(f, folder / f.name)
                staging.rmdir()

            writers[zero.ZERO_DIR] = move_partitions
        if acc.is_main_process:
            if has_lora(unet):  # the adapters alone, in diffusers' format (EMA weights when on): load_lora_weights(path/"lora")
                def write_lora(folder: Path) -> None:
                    with ema_weights(self.ema, self.trainable):
                        save_lora(unet, folder)

                writers["lora"] = write_lora
            save_checkpoint(path, unet, self.optimizer, self.method.state_dict(), state,
                            stateful=self._checkpoint_states(), rng_states=rng, extra_writers=writers,
                            model_state=model_state, optimizer_state=optimizer_state)
        acc.wait_for_everyone()
        return path

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer) if self.config.fsdp else self.optimizer
        written = read_trainer_state(path).get("optimizer_format")
        if (written == "deepspeed_zero") != self.deepspeed:
            raise ConfigError(f"checkpoint {str(path)!r} was written {'with' if written == 'deepspeed_zero' else 'without'} "
                              f"DeepSpeed and this run is {'with' if self.deepspeed else 'without'} it; resume with the "
                              "accelerate config it was written with")
        loaded = load_checkpoint(path, acc.unwrap_model(self.pipeline.unet), None if self.deepspeed else optimizer,
                                 stateful=self._checkpoint_states())
        if self.deepspeed:  # after the weights: DeepSpeed refreshes its float32 partitions from them
            zero.load_optimizer_partitions(self.model, path / zero.ZERO_DIR, acc.num_processes)
        state = loaded["trainer_state"]
        self.round = int(state["round"])
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.method.load_state_dict(loaded["method_state"])
        rng = loaded["rng_states"]
        if rng is not None and len(rng) == acc.num_processes:  # bit-identical resume needs the same process count
            restore_rng_state(rng[acc.process_index])


def train(config: TrainConfig, **kwargs) -> Dict:
    """Build a Trainer for `config` and run it (see Trainer for the keyword arguments)."""
    return Trainer(config, **kwargs).train()
