"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning"): TRL 0.7.11's
``DDPOTrainer`` math as pure, jittable functions.

- :func:`ddim_step_with_logprob`: TRL's ``scheduler_step`` (``trl/models/modeling_sd_base.py``):
  one eta > 0 DDIM step and the log-probability of ``prev_sample`` under its Gaussian.
- :func:`make_sample_fn`: the whole denoising trajectory (classifier-free guidance included) in
  one ``lax.scan``; returns latents ``[B, S+1, ...]``, log-probs ``[B, S]``, timesteps ``[B, S]``.
- :class:`PerPromptStatTracker`: TRL's per-prompt reward statistics, as a pytree of ring buffers
  indexed by integer prompt ids (the shell maps prompt strings to ids).
- :func:`ddpo_loss`, :func:`compute_loss`: the clipped objective of one timestep.
- :func:`make_train_inner_epoch`: one inner epoch (shuffle samples, shuffle timesteps per
  sample, train on the first ``train_timestep_fraction`` of them, gradients accumulated over
  ``train_gradient_accumulation_steps`` batches x trained timesteps as TRL's accelerate setup
  does, global-norm clipping, one optimizer update per accumulation window) in one ``lax.scan``.

Conventions: latents are ``[B, *latent_shape]`` (the tiny pipeline: ``[B, H, W, C]``); a
denoiser is ``unet_apply(params, latents, timesteps [B], embeds [B, L, D]) -> noise_pred``, or,
when the jitted functions get ``frozen_params``, ``unet_apply(params, latents, timesteps, embeds,
frozen_params)``: frozen weights are arguments of the compiled programs, never closed-over constants.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from rljax.diffusion.schedulers import DDIMSchedule
from rljax.train_state import TrainState

__all__ = [
    "ddim_step_with_logprob",
    "bind_frozen",
    "guided_noise_pred",
    "DDPOSamples",
    "make_sample_fn",
    "PerPromptStatTracker",
    "normalize_advantages",
    "ddpo_loss",
    "compute_loss",
    "make_ddpo_optimizer",
    "make_train_inner_epoch",
]

UnetApply = Callable[..., jax.Array]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def bind_frozen(unet_apply: UnetApply, frozen_params: Any) -> UnetApply:
    """``(params, latents, timesteps, embeds) -> noise_pred``: ``unet_apply`` itself when
    ``frozen_params`` is None, else ``unet_apply(params, latents, timesteps, embeds, frozen_params)``.

    Inside a jitted function ``frozen_params`` is a traced argument, so frozen weights (a LoRA
    base U-Net, a VAE) stay inputs of the compiled program instead of constants in it.
    """
    if frozen_params is None:
        return unet_apply
    return lambda params, latents, timesteps, embeds: unet_apply(params, latents, timesteps, embeds, frozen_params)


def _left_broadcast(x: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` (or scalar) -> ``[B, 1, ..., 1]`` with ``ndim`` dims (TRL's ``_left_broadcast``)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def ddim_step_with_logprob(
    schedule: DDIMSchedule,
    model_output: jax.Array,
    timestep: jax.Array,
    sample: jax.Array,
    eta: float = 0.0,
    *,
    key: Optional[jax.Array] = None,
    prev_sample: Optional[jax.Array] = None,
    use_clipped_model_output: bool = False,
) -> Tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{t-1} with its log-probability (TRL's ``scheduler_step``).

    Args:
      schedule: the :class:`DDIMSchedule` (``num_inference_steps`` sets the step stride).
      model_output: ``[B, ...]`` the denoiser's prediction (epsilon, sample or v).
      timestep: ``[B]`` or ``[]`` int, the current timestep t.
      sample: ``[B, ...]`` x_t.
      eta: DDIM's eta (noise weight); must be > 0 for a finite log-prob.
      key: PRNG key drawing x_{t-1} (when ``prev_sample`` is None).
      prev_sample: ``[B, ...]`` an x_{t-1} to score instead of drawing one (training).
    Returns:
      ``(prev_sample [B, ...], log_prob [B])``: log N(prev_sample; mean, std^2) averaged over all
      but the batch axis (TRL's convention), with ``prev_sample`` under ``stop_gradient``.

    As in TRL, the previous timestep is clamped to ``>= 0``, so the last step uses
    ``alphas_cumprod[0]`` (not ``final_alpha_cumprod``) and keeps a non-zero variance.
    """
    if (prev_sample is None) == (key is None):
        raise ValueError("Pass exactly one of key= (draw prev_sample) or prev_sample= (score a given one).")
    chex.assert_equal_shape([model_output, sample])
    ndim = sample.ndim
    timestep = jnp.asarray(timestep, jnp.int32)
    t_max = schedule.num_train_timesteps - 1
    prev_timestep = jnp.clip(timestep - schedule.num_train_timesteps // schedule.num_inference_steps, 0, t_max)
    ac = schedule.alphas_cumprod
    alpha_t = ac[timestep]
    alpha_prev = jnp.where(prev_timestep >= 0, ac[prev_timestep], schedule.final_alpha_cumprod)
    variance = ((1 - alpha_prev) / (1 - alpha_t)) * (1 - alpha_t / alpha_prev)
    alpha_t, alpha_prev = _left_broadcast(alpha_t, ndim), _left_broadcast(alpha_prev, ndim)
    beta_t = 1 - alpha_t

    if schedule.prediction_type == "epsilon":
        x0 = (sample - beta_t**0.5 * model_output) / alpha_t**0.5
        eps = model_output
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
    elif schedule.prediction_type == "v_prediction":
        x0 = alpha_t**0.5 * sample - beta_t**0.5 * model_output
        eps = alpha_t**0.5 * model_output + beta_t**0.5 * sample
    else:
        raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {schedule.prediction_type!r}.")
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)

    std = _left_broadcast(eta * variance**0.5, ndim)
    if use_clipped_model_output:
        eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
    direction = (1 - alpha_prev - std**2) ** 0.5 * eps
    mean = alpha_prev**0.5 * x0 + direction
    if prev_sample is None:
        prev_sample = mean + std * jax.random.normal(key, model_output.shape, model_output.dtype)
    else:
        chex.assert_equal_shape([prev_sample, sample])
    target = jax.lax.stop_gradient(prev_sample)
    log_prob = -((target - mean) ** 2) / (2 * std**2) - jnp.log(std) - _LOG_SQRT_2PI
    log_prob = log_prob.mean(axis=tuple(range(1, ndim)))
    return prev_sample.astype(sample.dtype), log_prob


def guided_noise_pred(
    unet_apply: UnetApply,
    params: Any,
    latents: jax.Array,
    timesteps: jax.Array,
    embeds: jax.Array,
    negative_embeds: Optional[jax.Array],
    guidance_scale: float,
) -> jax.Array:
    """The denoiser's prediction with classifier-free guidance when ``negative_embeds`` is given
    (one forward over ``[negative; prompt]``): ``uncond + guidance_scale * (cond - uncond)``.

    ``latents`` ``[B, ...]``, ``timesteps`` ``[B]``, ``embeds`` / ``negative_embeds`` ``[B, L, D]``.
    """
    if negative_embeds is None:
        return unet_apply(params, latents, timesteps, embeds)
    both = unet_apply(
        params,
        jnp.concatenate([latents, latents]),
        jnp.concatenate([timesteps, timesteps]),
        jnp.concatenate([negative_embeds, embeds]),
    )
    uncond, cond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)


class DDPOSamples(NamedTuple):
    """One sampled batch: ``latents [B, S+1, ...]`` (x_T ... x_0), ``log_probs [B, S]``,
    ``timesteps [B, S]`` int32."""

    latents: jax.Array
    log_probs: jax.Array
    timesteps: jax.Array


def make_sample_fn(
    unet_apply: UnetApply,
    latent_shape: Tuple[int, ...],
    *,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
) -> Callable[..., DDPOSamples]:
    """Build ``sample(params, schedule, prompt_embeds, negative_prompt_embeds, key, frozen_params=None)
    -> DDPOSamples`` (jitted): TRL's ``pipeline_step`` without decoding, the trajectory in one ``lax.scan``.

    ``prompt_embeds`` / ``negative_prompt_embeds``: ``[B, L, D]``. Guidance is on when
    ``guidance_scale > 1`` (diffusers' rule); then one denoiser call covers both halves.
    ``frozen_params`` (a pytree or None): passed to the denoiser as its fifth argument
    (:func:`bind_frozen`), so frozen weights are arguments of the compiled sampler, not constants.
    """
    do_cfg = guidance_scale > 1.0

    def sample(params, schedule: DDIMSchedule, prompt_embeds, negative_prompt_embeds, key,
               frozen_params: Any = None) -> DDPOSamples:
        chex.assert_rank(prompt_embeds, 3)
        denoise = bind_frozen(unet_apply, frozen_params)
        b = prompt_embeds.shape[0]
        key, k0 = jax.random.split(key)
        x_t = jax.random.normal(k0, (b, *latent_shape), jnp.float32) * schedule.init_noise_sigma
        step_keys = jax.random.split(key, schedule.num_inference_steps)

        def body(x, inp):
            t, k = inp
            ts = jnp.full((b,), t, jnp.int32)
            eps = guided_noise_pred(denoise, params, x, ts, prompt_embeds,
                                    negative_prompt_embeds if do_cfg else None, guidance_scale)
            x_prev, lp = ddim_step_with_logprob(schedule, eps, ts, x, eta, key=k)
            return x_prev, (x_prev, lp)

        _, (xs, lps) = jax.lax.scan(body, x_t, (schedule.timesteps, step_keys))
        latents = jnp.concatenate([x_t[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
        timesteps = jnp.broadcast_to(schedule.timesteps[None], (b, schedule.num_inference_steps))
        return DDPOSamples(latents, jnp.moveaxis(lps, 0, 1), timesteps)

    return jax.jit(sample)


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class PerPromptStatTracker:
    """TRL's ``PerPromptStatTracker`` as a pytree: one ring buffer of the last ``buffer_size``
    rewards per prompt id.

    Attributes:
      buffer: ``[num_prompts, buffer_size]`` float32 stored rewards.
      count: ``[num_prompts]`` int32, rewards stored (<= buffer_size).
      pos: ``[num_prompts]`` int32, next write slot.
    """

    buffer: jax.Array
    count: jax.Array
    pos: jax.Array
    buffer_size: int = flax.struct.field(pytree_node=False, default=16)
    min_count: int = flax.struct.field(pytree_node=False, default=16)

    @classmethod
    def create(cls, num_prompts: int, buffer_size: int, min_count: int) -> "PerPromptStatTracker":
        if buffer_size < 1 or num_prompts < 1:
            raise ValueError(f"buffer_size and num_prompts must be >= 1, got {buffer_size}, {num_prompts}.")
        return cls(
            buffer=jnp.zeros((num_prompts, buffer_size), jnp.float32),
            count=jnp.zeros((num_prompts,), jnp.int32),
            pos=jnp.zeros((num_prompts,), jnp.int32),
            buffer_size=int(buffer_size),
            min_count=int(min_count),
        )

    @property
    def num_prompts(self) -> int:
        return self.buffer.shape[0]

    def grow(self, num_prompts: int) -> "PerPromptStatTracker":
        """The same tracker with room for ``num_prompts`` prompt ids (host side, new shapes)."""
        extra = num_prompts - self.num_prompts
        if extra <= 0:
            return self
        return self.replace(
            buffer=jnp.concatenate([self.buffer, jnp.zeros((extra, self.buffer_size), self.buffer.dtype)]),
            count=jnp.concatenate([self.count, jnp.zeros((extra,), jnp.int32)]),
            pos=jnp.concatenate([self.pos, jnp.zeros((extra,), jnp.int32)]),
        )

    def update(self, prompt_ids: jax.Array, rewards: jax.Array) -> Tuple["PerPromptStatTracker", jax.Array]:
        """Append ``rewards`` ``[N]`` under ``prompt_ids`` ``[N]`` (in order, like a deque's
        ``extend``), then return ``(tracker, advantages [N])``: ``(r - mean) / (std + 1e-6)`` over
        the prompt's buffer, or over this batch's rewards while the buffer holds fewer than
        ``min_count`` (population std, as numpy)."""
        chex.assert_rank([prompt_ids, rewards], 1)
        chex.assert_equal_shape([prompt_ids, rewards])
        rewards = rewards.astype(jnp.float32)
        same = prompt_ids[:, None] == prompt_ids[None, :]  # [N, N]
        n = rewards.shape[0]
        earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
        rank = jnp.sum(same & earlier, axis=1)  # position of each reward among its prompt's in this batch
        n_new = jnp.sum(same, axis=1)  # this batch's rewards of each sample's prompt
        keep = rank >= n_new - self.buffer_size  # only the last buffer_size survive a deque's extend
        slot = (self.pos[prompt_ids] + rank) % self.buffer_size
        rows = jnp.where(keep, prompt_ids, self.num_prompts)  # out of range: dropped
        buffer = self.buffer.at[rows, slot].set(rewards, mode="drop")
        added = jnp.zeros_like(self.count).at[prompt_ids].add(1)
        count = jnp.minimum(self.count + added, self.buffer_size)
        pos = (self.pos + added) % self.buffer_size
        new = self.replace(buffer=buffer, count=count, pos=pos)

        valid = jnp.arange(self.buffer_size)[None, :] < count[:, None]
        cnt = jnp.maximum(count, 1).astype(jnp.float32)
        p_mean = jnp.sum(jnp.where(valid, buffer, 0.0), axis=1) / cnt
        p_var = jnp.sum(jnp.where(valid, (buffer - p_mean[:, None]) ** 2, 0.0), axis=1) / cnt
        use_prompt = count[prompt_ids] >= self.min_count
        mean = jnp.where(use_prompt, p_mean[prompt_ids], jnp.mean(rewards))
        std = jnp.where(use_prompt, jnp.sqrt(p_var[prompt_ids]), jnp.std(rewards)) + 1e-6
        return new, (rewards - mean) / std

    def get_stats(self) -> Dict[int, Dict[str, float]]:
        """``{prompt_id: {"mean", "std", "count"}}`` for every id with stored rewards (host)."""
        import numpy as np

        buf, count = np.asarray(self.buffer), np.asarray(self.count)
        return {i: {"mean": float(buf[i, :c].mean()), "std": float(buf[i, :c].std()), "count": int(c)}
                for i, c in enumerate(count) if c > 0}


def normalize_advantages(rewards: jax.Array) -> jax.Array:
    """Whole-batch advantages ``(r - mean) / (std + 1e-8)`` (TRL without per-prompt tracking)."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


# ---------------------------------------------------------------------------------------
# Loss and training
# ---------------------------------------------------------------------------------------


def ddpo_loss(advantages: jax.Array, clip_range: float, ratio: jax.Array) -> jax.Array:
    """TRL's ``DDPOTrainer.loss``: ``mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.mean(jnp.maximum(unclipped, clipped))


def compute_loss(
    unet_apply: UnetApply,
    params: Any,
    schedule: DDIMSchedule,
    latents: jax.Array,
    timesteps: jax.Array,
    next_latents: jax.Array,
    log_probs: jax.Array,
    advantages: jax.Array,
    prompt_embeds: jax.Array,
    negative_prompt_embeds: Optional[jax.Array],
    *,
    guidance_scale: float,
    eta: float,
    adv_clip_max: float,
    clip_range: float,
    frozen_params: Any = None,
) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """TRL's ``calculate_loss`` for one timestep of a batch; returns ``(loss, (approx_kl, clipfrac))``.

    ``latents`` / ``next_latents`` ``[B, ...]``, ``timesteps``, ``log_probs``, ``advantages``
    ``[B]``; embeds ``[B, L, D]``; ``negative_prompt_embeds=None`` trains without guidance
    (``train_cfg=False``); ``frozen_params``: see :func:`bind_frozen`.
    """
    noise_pred = guided_noise_pred(bind_frozen(unet_apply, frozen_params), params, latents, timesteps, prompt_embeds,
                                   negative_prompt_embeds, guidance_scale)
    _, log_prob = ddim_step_with_logprob(schedule, noise_pred, timesteps, latents, eta, prev_sample=next_latents)
    advantages = jnp.clip(advantages, -adv_clip_max, adv_clip_max)
    ratio = jnp.exp(log_prob - log_probs)
    loss = ddpo_loss(advantages, clip_range, ratio)
    approx_kl = 0.5 * jnp.mean((log_prob - log_probs) ** 2)
    clipfrac = jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32))
    return loss, (approx_kl, clipfrac)


def make_ddpo_optimizer(config: Any) -> optax.GradientTransformation:
    """TRL's optimizer: global-norm clipping at ``train_max_grad_norm`` then torch-style AdamW."""
    return optax.chain(
        optax.clip_by_global_norm(config.train_max_grad_norm),
        optax.adamw(
            config.train_learning_rate,
            b1=config.train_adam_beta1,
            b2=config.train_adam_beta2,
            eps=config.train_adam_epsilon,
            weight_decay=config.train_adam_weight_decay,
        ),
    )


def make_train_inner_epoch(unet_apply: UnetApply,
                           config: Any) -> Callable[..., Tuple[TrainState, Dict[str, jax.Array]]]:
    """Build ``train_inner_epoch(state, schedule, batch, key, frozen_params=None) -> (state, metrics)``
    (jitted; ``frozen_params`` reach the denoiser as in :func:`make_sample_fn`, not differentiated).

    ``batch``: dict with ``latents [N, S, ...]`` (x_t), ``next_latents [N, S, ...]``,
    ``log_probs [N, S]``, ``timesteps [N, S]``, ``advantages [N]``, ``prompt_embeds`` and
    ``negative_prompt_embeds [N, L, D]``. ``state.tx`` must already clip gradients
    (:func:`make_ddpo_optimizer`). ``metrics``: ``loss``, ``approx_kl``, ``clipfrac`` as
    ``[num_updates]`` arrays, each the mean over one accumulation window (TRL logs one line per
    optimizer step).

    Order of work is TRL's: shuffle samples, shuffle each sample's timesteps, split into
    ``train_batch_size`` batches; for each batch, for each of the first
    ``int(sample_num_steps * train_timestep_fraction)`` shuffled timesteps, add the gradient
    of ``loss / (GA * T_train)``; update after every ``GA`` batches.
    """
    tb = int(config.train_batch_size)
    ga = int(config.train_gradient_accumulation_steps)
    guidance, eta = float(config.sample_guidance_scale), float(config.sample_eta)
    train_cfg = bool(config.train_cfg)

    def loss_fn(params, schedule, mb, frozen_params):
        return compute_loss(
            unet_apply, params, schedule, mb["latents"], mb["timesteps"], mb["next_latents"], mb["log_probs"],
            mb["advantages"], mb["prompt_embeds"], mb["negative_prompt_embeds"] if train_cfg else None,
            guidance_scale=guidance, eta=eta, adv_clip_max=config.train_adv_clip_max,
            clip_range=config.train_clip_range,
            frozen_params=frozen_params,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_inner_epoch(state: TrainState, schedule: DDIMSchedule, batch: Dict[str, jax.Array], key: jax.Array,
                          frozen_params: Any = None):
        n, s = batch["timesteps"].shape
        t_train = int(s * config.train_timestep_fraction)
        if t_train < 1:
            raise ValueError(f"train_timestep_fraction={config.train_timestep_fraction} trains no timestep of {s}.")
        if n % (tb * ga):
            raise ValueError(f"{n} samples do not split into train_batch_size={tb} x gradient_accumulation_steps={ga}.")
        k_perm, k_time = jax.random.split(key)
        perm = jax.random.permutation(k_perm, n)
        batch = jax.tree_util.tree_map(lambda v: v[perm], batch)
        tperm = jax.vmap(lambda k: jax.random.permutation(k, s))(jax.random.split(k_time, n))[:, :t_train]
        rows = jnp.arange(n)[:, None]
        per_t = {k: batch[k][rows, tperm] for k in ("latents", "next_latents", "log_probs", "timesteps")}
        per_sample = {k: batch[k] for k in ("advantages", "prompt_embeds", "negative_prompt_embeds")}
        num_updates = n // (tb * ga)
        # [U, GA, tb, T, ...] -> micro-steps [U, GA * T] of [tb, ...]: batch-major then timestep, as TRL loops.
        def to_micro_t(v):
            v = v.reshape(num_updates, ga, tb, t_train, *v.shape[2:])
            v = jnp.moveaxis(v, 3, 2)  # [U, GA, T, tb, ...]
            return v.reshape(num_updates, ga * t_train, tb, *v.shape[4:])

        def to_micro_s(v):
            v = v.reshape(num_updates, ga, 1, tb, *v.shape[1:])
            v = jnp.broadcast_to(v, (num_updates, ga, t_train, tb, *v.shape[4:]))
            return v.reshape(num_updates, ga * t_train, tb, *v.shape[4:])

        micro = {**{k: to_micro_t(v) for k, v in per_t.items()}, **{k: to_micro_s(v) for k, v in per_sample.items()}}
        scale = 1.0 / (ga * t_train)

        def update(state, window):
            def micro_step(acc, mb):
                (loss, (kl, cf)), g = grad_fn(state.params, schedule, mb, frozen_params)
                acc = jax.tree_util.tree_map(lambda a, b: a + scale * b, acc, g)
                return acc, (loss, kl, cf)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads, (loss, kl, cf) = jax.lax.scan(micro_step, zeros, window)
            return state.apply_gradients(grads), {"loss": loss.mean(), "approx_kl": kl.mean(), "clipfrac": cf.mean()}

        return jax.lax.scan(update, state, micro)

    return jax.jit(train_inner_epoch)
