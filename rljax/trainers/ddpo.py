"""TRL 0.7.11's ``DDPOConfig`` / ``DDPOTrainer`` as a thin shell over ``rljax.ddpo``.

The shell owns the host side: calling ``prompt_function`` and the (Python) reward function,
tokenizing prompts, logging TRL's keys, checkpoints, the image hook. The math (the scan
sampler, the clipped loss, accumulation and updates) is ``rljax.ddpo``'s jitted functions; the
trained state is a ``rljax.train_state.TrainState`` at ``trainer.state`` (and is copied back
into the pipeline with ``pipeline.set_params`` after every epoch).

A TRL script ports by swapping imports and the pipeline::

    trainer = DDPOTrainer(DDPOConfig(...), reward_fn, prompt_fn, TinyDDPOPipeline(), image_samples_hook=hook)
    trainer.train()

Differences from TRL (deliberate): the reward function gets images as a JAX array
``[B, H, W, C]`` in ``[0, 1]`` (TRL: a torch ``[B, C, H, W]`` tensor); ``mixed_precision`` is
accepted and not applied (JAX computes float32 here); ``async_reward_computation`` submits each
sampled batch's reward call to a thread pool while the next batch samples (TRL's
``executor.map`` path); checkpoints are ``rljax.checkpoint`` step directories (step = epoch).
"""
from __future__ import annotations

import os
import sys
import warnings
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax.core import flatten_dict
from rljax.ddpo import (
    PerPromptStatTracker,
    compute_loss,
    ddpo_loss,
    make_ddpo_optimizer,
    make_sample_fn,
    make_train_inner_epoch,
    normalize_advantages,
)
from rljax.diffusion.schedulers import make_ddim_schedule
from rljax.train_state import TrainState

__all__ = ["DDPOConfig", "DDPOTrainer"]


def _default_exp_name() -> str:
    name = os.path.basename(sys.argv[0])
    return name[: -len(".py")] if name.endswith(".py") else name


@dataclass
class DDPOConfig:
    """Configuration of DDPOTrainer: TRL 0.7.11's fields, names and defaults."""

    exp_name: str = field(default_factory=_default_exp_name)
    run_name: Optional[str] = ""
    seed: int = 0
    log_with: Optional[str] = None
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    logdir: str = "logs"
    num_epochs: int = 100
    save_freq: int = 1
    num_checkpoint_limit: int = 5
    mixed_precision: Optional[str] = "fp16"
    allow_tf32: bool = True
    resume_from: Optional[str] = ""
    sample_num_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    sample_batch_size: int = 1
    sample_num_batches_per_epoch: int = 2
    train_batch_size: int = 1
    train_use_8bit_adam: bool = False
    train_learning_rate: float = 3e-4
    train_adam_beta1: float = 0.9
    train_adam_beta2: float = 0.999
    train_adam_weight_decay: float = 1e-4
    train_adam_epsilon: float = 1e-8
    train_gradient_accumulation_steps: int = 1
    train_max_grad_norm: float = 1.0
    train_num_inner_epochs: int = 1
    train_cfg: bool = True
    train_adv_clip_max: float = 5
    train_clip_range: float = 1e-4
    train_timestep_fraction: float = 1.0
    per_prompt_stat_tracking: bool = False
    per_prompt_stat_tracking_buffer_size: int = 16
    per_prompt_stat_tracking_min_count: int = 16
    async_reward_computation: bool = False
    max_workers: int = 2
    negative_prompts: Optional[str] = ""

    def __post_init__(self):
        if self.log_with not in (None, "wandb", "tensorboard", "jsonl", "stdout"):
            raise ValueError(
                f"log_with must be None, 'wandb', 'tensorboard', 'jsonl' or 'stdout', got {self.log_with!r}.")
        if self.train_use_8bit_adam:
            raise ValueError("train_use_8bit_adam=True (bitsandbytes) has no JAX counterpart here; set it to False.")
        for name in ("sample_num_steps", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
                     "train_gradient_accumulation_steps", "train_num_inner_epochs", "save_freq"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.train_timestep_fraction <= 1.0:
            raise ValueError(f"train_timestep_fraction must be in (0, 1], got {self.train_timestep_fraction}.")
        if self.sample_eta <= 0:
            raise ValueError(
                f"sample_eta must be > 0 (the DDPO log-probs need a stochastic sampler), got {self.sample_eta}.")

    def to_dict(self) -> Dict[str, Any]:
        return flatten_dict(dict(self.__dict__))


class DDPOTrainer:
    """Deep Diffusion Policy Optimization (TRL 0.7.11's ``DDPOTrainer``) on an rljax pipeline.

    Args:
      config: :class:`DDPOConfig`.
      reward_function: ``(images [B, H, W, C] in [0, 1], prompts tuple, prompt_metadata tuple)
        -> (rewards [B], reward_metadata)``.
      prompt_function: ``() -> (prompt str, metadata)``.
      sd_pipeline: a ``rljax.diffusion.pipeline.DDPOPipeline`` (e.g. ``TinyDDPOPipeline``).
      image_samples_hook: ``(prompt_image_data, global_step, logger)``; ``prompt_image_data`` is a
        list (one per sample batch) of ``[images, prompts, metadata, rewards, reward_metadata]``.
    """

    _tag_names = ["trl", "ddpo"]

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable[..., Tuple[Any, Any]],
        prompt_function: Callable[[], Tuple[str, Any]],
        sd_pipeline: Any,
        image_samples_hook: Optional[Callable[[Any, Any, Any], Any]] = None,
    ):
        if image_samples_hook is None:
            warnings.warn("No image_samples_hook provided; no images will be logged", stacklevel=2)
        for name in ("unet_apply", "encode_prompts", "decode_latents", "params", "set_params", "latent_shape",
                     "scheduler_config", "tokenizer"):
            if not hasattr(sd_pipeline, name):
                raise ValueError(f"sd_pipeline lacks `{name}`: pass a rljax.diffusion.pipeline.DDPOPipeline "
                                 "(e.g. TinyDDPOPipeline()).")
        self.config = config
        self.reward_fn = reward_function
        self.prompt_fn = prompt_function
        self.sd_pipeline = sd_pipeline
        self.image_samples_callback = image_samples_hook
        self.num_train_timesteps = int(config.sample_num_steps * config.train_timestep_fraction)
        ok, message = self._config_check()
        if not ok:
            raise ValueError(message)

        self.schedule = make_ddim_schedule(sd_pipeline.scheduler_config, config.sample_num_steps)
        if int(self.schedule.timesteps[-1]) == 0:
            raise ValueError(
                "The scheduler's last timestep is 0, where TRL's DDIM step has zero variance (log-prob NaN). "
                "Set the scheduler config's steps_offset=1 (as Stable Diffusion does) or timestep_spacing='trailing'."
            )
        self.tx = make_ddpo_optimizer(config)
        self.rng = jax.random.PRNGKey(config.seed)
        self.state = TrainState.create(sd_pipeline.params, self.tx, jax.random.PRNGKey(config.seed))
        neg = [""] if config.negative_prompts is None else [config.negative_prompts]
        self.neg_prompt_embed = sd_pipeline.encode_prompts(neg)  # [1, L, D]
        self._sample = make_sample_fn(sd_pipeline.unet_apply, tuple(sd_pipeline.latent_shape),
                                      guidance_scale=config.sample_guidance_scale, eta=config.sample_eta)
        # frozen weights (VAE, a LoRA base U-Net) are jit arguments, not constants of the programs
        self._decode = jax.jit(
            lambda latents, frozen: sd_pipeline.decode_latents(latents) if frozen is None
            else sd_pipeline.decode_latents(latents, frozen))
        self._train_inner_epoch = make_train_inner_epoch(sd_pipeline.unet_apply, config)
        self._tracker_update = jax.jit(lambda tr, p, r: tr.update(p, r))
        self.prompt_ids: Dict[str, int] = {}
        self.stat_tracker: Optional[PerPromptStatTracker] = None
        if config.per_prompt_stat_tracking:
            self.stat_tracker = PerPromptStatTracker.create(
                8, config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count)
        self.executor = (futures.ThreadPoolExecutor(max_workers=config.max_workers)
                         if config.async_reward_computation else None)
        self.log_history: List[Dict[str, Any]] = []
        self._logger = None
        self._checkpointer = None
        self.first_epoch = 0
        self.global_step = 0
        if config.resume_from:
            self._resume(config.resume_from)

    # -- the jitted programs, with the pipeline's frozen params as arguments --------------
    @property
    def frozen_params(self) -> Any:
        """The pipeline's ``frozen_params`` (None for a pipeline without them)."""
        return getattr(self.sd_pipeline, "frozen_params", None)

    def sample(self, params: Any, prompt_embeds: jax.Array, negative_prompt_embeds: jax.Array, key: jax.Array):
        """One sampled batch (``rljax.ddpo.DDPOSamples``) under ``params``; embeds ``[B, L, D]``."""
        return self._sample(params, self.schedule, prompt_embeds, negative_prompt_embeds, key, self.frozen_params)

    def decode(self, latents: jax.Array) -> jax.Array:
        """``latents [B, *latent_shape]`` -> images ``[B, H, W, C]`` in ``[0, 1]`` (jitted decoder)."""
        return self._decode(latents, self.frozen_params)

    # -- checks, files -----------------------------------------------------------------
    def _config_check(self) -> Tuple[bool, str]:
        c = self.config
        samples_per_epoch = c.sample_batch_size * jax.process_count() * c.sample_num_batches_per_epoch
        total_train_batch_size = c.train_batch_size * jax.process_count() * c.train_gradient_accumulation_steps
        if not c.sample_batch_size >= c.train_batch_size:
            return False, (f"Sample batch size ({c.sample_batch_size}) must be greater than or equal to the train "
                           f"batch size ({c.train_batch_size})")
        if not c.sample_batch_size % c.train_batch_size == 0:
            return False, (f"Sample batch size ({c.sample_batch_size}) must be divisible by the train batch size "
                           f"({c.train_batch_size})")
        if not samples_per_epoch % total_train_batch_size == 0:
            return False, (f"Number of samples per epoch ({samples_per_epoch}) must be divisible by the total train "
                           f"batch size ({total_train_batch_size})")
        if self.num_train_timesteps < 1:
            return False, (f"train_timestep_fraction={c.train_timestep_fraction} of sample_num_steps="
                           f"{c.sample_num_steps} trains no timestep; raise one of them")
        return True, ""

    def checkpoint_dir(self) -> str:
        """Where checkpoints go: ``project_kwargs["project_dir"]/checkpoints`` or
        ``logdir/<run_name or exp_name>/checkpoints``."""
        c = self.config
        root = c.project_kwargs.get("project_dir") or os.path.join(c.logdir, c.run_name or c.exp_name or "ddpo")
        return os.path.join(root, "checkpoints")

    def _checkpoint_extra(self, epoch: int) -> Dict[str, Any]:
        return {"epoch": int(epoch), "global_step": int(self.global_step), "rng": np.asarray(self.rng),
                "prompt_ids": dict(self.prompt_ids)}

    def _ckpt_state(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"train_state": self.state}
        if self.stat_tracker is not None:
            out["stat_tracker"] = self.stat_tracker
        return out

    def save_checkpoint(self, epoch: int) -> None:
        """Checkpoint the train state (params, optimizer state), stat tracker and PRNG key at ``epoch``."""
        from rljax.checkpoint import Checkpointer

        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.checkpoint_dir(), max_to_keep=self.config.num_checkpoint_limit,
                                              async_save=False, resume=True)
        self._checkpointer.save(int(epoch), self._ckpt_state(), self._checkpoint_extra(epoch), force=True)

    def _resume(self, path: str) -> None:
        from rljax.checkpoint import Checkpointer

        path = os.path.normpath(os.path.expanduser(path))
        step = None
        if os.path.basename(path).isdigit():  # one step directory
            path, step = os.path.dirname(path), int(os.path.basename(path))
        if not os.path.isdir(path):
            raise ValueError(f"resume_from={self.config.resume_from!r} is not a checkpoint directory; pass the "
                             f"trainer's checkpoint_dir() (e.g. {self.checkpoint_dir()!r}) or one step inside it.")
        with Checkpointer(path, resume=True, async_save=False) as ck:
            extra = ck.read_extra(step)
            ids = {str(k): int(v) for k, v in extra.get("prompt_ids", {}).items()}
            if self.stat_tracker is not None and ids:
                self.stat_tracker = self.stat_tracker.grow(max(8, 2 * len(ids)))
            restored, extra = ck.restore(step, self._ckpt_state())
        self.state = restored["train_state"]
        if self.stat_tracker is not None:
            self.stat_tracker = restored["stat_tracker"]
        self.prompt_ids = ids
        self.rng = jnp.asarray(extra["rng"], jnp.uint32)
        self.global_step = int(extra["global_step"])
        self.first_epoch = int(extra["epoch"]) + 1
        self.sd_pipeline.set_params(self.state.params)

    def save_pretrained(self, save_directory: str) -> None:
        """The pipeline with the trained params (``pipeline.save_pretrained``)."""
        self.sd_pipeline.set_params(self.state.params)
        self.sd_pipeline.save_pretrained(save_directory)

    _save_pretrained = save_pretrained

    # -- logging -----------------------------------------------------------------------
    def _log(self, stats: Dict[str, Any], step: int) -> None:
        self.log_history.append({**stats, "step": int(step)})
        if self.config.log_with is None:
            return
        if self._logger is None:
            from rljax.logging import MetricLogger

            c = self.config
            logdir = c.project_kwargs.get("logging_dir") or os.path.join(c.logdir, c.run_name or c.exp_name or "ddpo")
            self._logger = MetricLogger([c.log_with], logdir, config=c.to_dict(), project_name=c.tracker_project_name,
                                        tracker_kwargs=c.tracker_kwargs)
        self._logger.log(stats, step)

    # -- TRL's methods -----------------------------------------------------------------
    def _next_key(self) -> jax.Array:
        self.rng, key = jax.random.split(self.rng)
        return key

    def loss(self, advantages: Any, clip_range: float, ratio: Any) -> jax.Array:
        """TRL's clipped surrogate, ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``."""
        return ddpo_loss(jnp.asarray(advantages, jnp.float32), clip_range, jnp.asarray(ratio, jnp.float32))

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """TRL's ``calculate_loss`` for one timestep of a batch: ``embeds`` is ``[2B, L, D]``
        (negative then prompt embeddings) with ``train_cfg``, else ``[B, L, D]``.
        Returns ``(loss, approx_kl, clipfrac)``."""
        c = self.config
        embeds = jnp.asarray(embeds)
        neg = None
        if c.train_cfg:
            neg, embeds = jnp.split(embeds, 2)
        loss, (kl, cf) = compute_loss(
            self.sd_pipeline.unet_apply, self.state.params, self.schedule, jnp.asarray(latents),
            jnp.asarray(timesteps, jnp.int32), jnp.asarray(next_latents), jnp.asarray(log_probs),
            jnp.asarray(advantages, jnp.float32), embeds, neg, guidance_scale=c.sample_guidance_scale,
            eta=c.sample_eta, adv_clip_max=c.train_adv_clip_max, clip_range=c.train_clip_range,
            frozen_params=self.frozen_params)
        return loss, kl, cf

    def _generate_samples(self, iterations: int, batch_size: int):
        """Sample ``iterations`` batches; returns ``(samples, prompt_image_pairs)`` like TRL:
        ``samples[i]`` holds ``prompt_ids [B, L]``, ``prompt_embeds [B, L, D]``, ``timesteps [B, S]``,
        ``latents`` / ``next_latents [B, S, ...]``, ``log_probs [B, S]``,
        ``negative_prompt_embeds [B, L, D]``; ``prompt_image_pairs[i] = [images, prompts, metadata]``."""
        samples, pairs = [], []
        neg = jnp.repeat(self.neg_prompt_embed, batch_size, axis=0)
        for _ in range(iterations):
            prompts, metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            prompt_ids = self.sd_pipeline.tokenizer(list(prompts))
            embeds = self.sd_pipeline.encode_prompts(list(prompts))
            out = self.sample(self.state.params, embeds, neg, self._next_key())
            images = self.decode(out.latents[:, -1])
            samples.append({
                "prompt_ids": np.asarray(prompt_ids),
                "prompt_embeds": embeds,
                "timesteps": out.timesteps,
                "latents": out.latents[:, :-1],
                "next_latents": out.latents[:, 1:],
                "log_probs": out.log_probs,
                "negative_prompt_embeds": neg,
            })
            pairs.append([images, prompts, metadata])
        return samples, pairs

    def compute_rewards(self, prompt_image_pairs, is_async: bool = False):
        """Call the reward function on each batch (in the thread pool when ``is_async``);
        returns ``(rewards tuple of [B] arrays, reward_metadata tuple)``."""
        if is_async and self.executor is not None:
            futs = [self.executor.submit(self.reward_fn, *pair) for pair in prompt_image_pairs]
            results = [f.result() for f in futs]
        else:
            results = [self.reward_fn(*pair) for pair in prompt_image_pairs]
        rewards = []
        for reward, _ in results:
            r = np.asarray(reward, np.float32).reshape(-1)
            if not np.all(np.isfinite(r)):
                raise ValueError(f"reward_function returned non-finite rewards {r}; return finite floats.")
            rewards.append(r)
        return tuple(rewards), tuple(m for _, m in results)

    def _advantages(self, prompt_ids: np.ndarray, rewards: np.ndarray) -> jax.Array:
        if self.stat_tracker is None:
            return normalize_advantages(jnp.asarray(rewards))
        prompts = self.sd_pipeline.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        for p in prompts:
            self.prompt_ids.setdefault(p, len(self.prompt_ids))
        if len(self.prompt_ids) > self.stat_tracker.num_prompts:
            self.stat_tracker = self.stat_tracker.grow(2 * len(self.prompt_ids))
        ids = jnp.asarray([self.prompt_ids[p] for p in prompts], jnp.int32)
        self.stat_tracker, adv = self._tracker_update(self.stat_tracker, ids, jnp.asarray(rewards))
        return adv

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample, score, compute advantages, ``train_num_inner_epochs`` inner epochs;
        logs ``reward``, ``epoch``, ``reward_mean``, ``reward_std`` and, per optimizer update,
        ``approx_kl``, ``clipfrac``, ``loss``, ``epoch``, ``inner_epoch``. Returns the new global step."""
        c = self.config
        samples, prompt_image_data = self._generate_samples(c.sample_num_batches_per_epoch, c.sample_batch_size)
        rewards, rewards_metadata = self.compute_rewards(prompt_image_data, is_async=c.async_reward_computation)
        for i, data in enumerate(prompt_image_data):
            data.extend([rewards[i], rewards_metadata[i]])
        if self.image_samples_callback is not None:
            self.image_samples_callback(prompt_image_data, global_step, self._logger)
        rewards_np = np.concatenate(rewards)
        self._log({"reward": rewards_np, "epoch": epoch, "reward_mean": float(rewards_np.mean()),
                   "reward_std": float(rewards_np.std())}, global_step)
        prompt_ids = np.concatenate([s["prompt_ids"] for s in samples])
        batch = {k: jnp.concatenate([s[k] for s in samples]) for k in samples[0] if k != "prompt_ids"}
        batch["advantages"] = self._advantages(prompt_ids, rewards_np)
        for inner_epoch in range(c.train_num_inner_epochs):
            self.state, metrics = self._train_inner_epoch(self.state, self.schedule, batch, self._next_key(),
                                                             self.frozen_params)
            metrics = jax.device_get(metrics)
            for u in range(len(metrics["loss"])):
                self._log({"approx_kl": float(metrics["approx_kl"][u]), "clipfrac": float(metrics["clipfrac"][u]),
                           "loss": float(metrics["loss"][u]), "epoch": epoch, "inner_epoch": inner_epoch}, global_step)
                global_step += 1
        self.sd_pipeline.set_params(self.state.params)
        self.global_step = global_step
        if epoch != 0 and epoch % c.save_freq == 0:
            self.save_checkpoint(epoch)
        return global_step

    def train(self, epochs: Optional[int] = None, progress_bar: bool = True) -> None:
        """Train for epochs ``first_epoch .. epochs - 1`` (``epochs`` defaults to ``num_epochs``)."""
        epochs = self.config.num_epochs if epochs is None else int(epochs)
        rng_epochs = range(self.first_epoch, epochs)
        if progress_bar:
            try:
                from tqdm.auto import tqdm

                rng_epochs = tqdm(rng_epochs, desc="DDPO epoch", leave=False, dynamic_ncols=True)
            except ImportError:
                pass
        try:
            for epoch in rng_epochs:
                self.global_step = self.step(epoch, self.global_step)
                if progress_bar and hasattr(rng_epochs, "set_postfix"):
                    last = next((h for h in reversed(self.log_history) if "reward_mean" in h), None)
                    if last is not None:
                        rng_epochs.set_postfix(reward=f"{last['reward_mean']:.3f}")
            self.first_epoch = max(self.first_epoch, epochs)
        finally:
            if self._checkpointer is not None:
                self._checkpointer.wait_until_finished()

    def close(self) -> None:
        """Finish pending checkpoints, close loggers and the reward thread pool."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


