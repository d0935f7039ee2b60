"""PPO for causal language models with TRL 0.7.11's semantics, the JAX way.

Read top to bottom:

1. Functional math (pure, jittable, no hidden state): `kl_penalty`,
   `compute_rewards`, `compute_advantages`, the KL controllers
   (`KLControllerState`, `adaptive_kl_update`, ...), `process_scores` and
   `step_stats`. String / bool options (`kl_penalty`, `whiten_rewards`,
   `use_score_*`) select code paths, so pass them as static arguments when
   jitting: `jax.jit(compute_rewards, static_argnames="kl_penalty")`.
2. Host-side helpers: `validate_scores` (runs before anything is traced).
3. `PPOConfig` (TRL's field names and defaults) and TRL-style controller
   classes (`AdaptiveKLController`, `FixedKLController`) as thin shells.

Shapes: `B` batch, `T` response-aligned sequence length (TRL's `T-1` after
the logits/labels shift), `V` vocabulary. Where TRL 0.7.11 has a quirk it is
matched unless a docstring says "deliberate fix"; each such detail is described
where it is matched ("TRL 0.7.11 detail: ...").
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import warnings
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from rljax.core import (
    RunningMomentsState,
    flatten_dict,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    running_moments_update,
)

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, int]

KL_PENALTY_MODES = ("kl", "abs", "mse", "full")


# ==========================================================================
# 1. Functional math
# ==========================================================================


def _check_kl_mode(mode: str) -> None:
    if mode not in KL_PENALTY_MODES:
        raise ValueError(
            f"kl_penalty must be one of {KL_PENALTY_MODES}, got {mode!r}; "
            "set PPOConfig(kl_penalty=...) to one of those."
        )


def kl_penalty(logprob: ArrayLike, ref_logprob: ArrayLike, mode: str = "kl") -> Array:
    """Per-token KL penalty between the policy and the reference model.

    mode (static):
      * "kl":  logprob - ref_logprob                     ([B, T] -> [B, T])
      * "abs": |logprob - ref_logprob|                   ([B, T] -> [B, T])
      * "mse": 0.5 * (logprob - ref_logprob)**2          ([B, T] -> [B, T])
      * "full": the exact KL(pi || ref) of each position's next-token
        distribution, sum_v exp(lp_v) * (lp_v - ref_v). Here `logprob` and
        `ref_logprob` are FULL log-softmax distributions [..., V] and the
        result drops the last axis ([B, T, V] -> [B, T]). As TRL's
        `F.kl_div(ref, lp, log_target=True).sum(-1)`, except that a token with
        probability exactly 0 (log-prob -inf) contributes 0 rather than NaN.
    """
    _check_kl_mode(mode)
    logprob = jnp.asarray(logprob)
    ref_logprob = jnp.asarray(ref_logprob)
    chex.assert_equal_shape([logprob, ref_logprob])
    if mode == "kl":
        return logprob - ref_logprob
    if mode == "abs":
        return jnp.abs(logprob - ref_logprob)
    if mode == "mse":
        return 0.5 * jnp.square(logprob - ref_logprob)
    chex.assert_rank(logprob, {2, 3})
    terms = jnp.exp(logprob) * (logprob - ref_logprob)
    terms = jnp.where(jnp.isneginf(logprob), jnp.zeros_like(terms), terms)
    return jnp.sum(terms, axis=-1)


# `compute_rewards` has an argument named `kl_penalty` (TRL's name), which
# shadows the function inside it.
_kl_penalty_fn = kl_penalty


def _last_unmasked(masks: Array) -> Array:
    """[B, T] bool: True only at the last nonzero mask position of each row.

    TRL's `mask.nonzero()[-1]` (TRL 0.7.11 detail: with response masks that zero the tail, the score moves to the last unmasked token); rows with no nonzero entry are all False.
    """
    nonzero = masks != 0
    T = masks.shape[-1]
    last = T - 1 - jnp.argmax(nonzero[:, ::-1], axis=-1)
    has_any = jnp.any(nonzero, axis=-1)
    return (jnp.arange(T)[None, :] == last[:, None]) & has_any[:, None]


def compute_rewards(
    scores: ArrayLike,
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    masks: ArrayLike,
    kl_coef: ArrayLike,
    kl_penalty: str = "kl",
    logits: Optional[ArrayLike] = None,
    ref_logits: Optional[ArrayLike] = None,
) -> Tuple[Array, Array, Array]:
    """Per-token rewards: a KL penalty everywhere plus the score at the end.

    Args:
      scores: [B] one scalar score per sequence (after `process_scores`).
      logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under the
        policy and the reference model. For kl_penalty="full" these must
        instead be the FULL log-softmax distributions [B, T, V] (what TRL
        passes in that mode), unless `logits`/`ref_logits` are given.
      masks: [B, T] response mask (nonzero = response token).
      kl_coef: scalar KL coefficient (e.g. `KLControllerState.value`).
      kl_penalty: "kl" | "abs" | "mse" | "full" (static).
      logits, ref_logits: optional [B, T, V] raw logits of both models, used
        only by kl_penalty="full" (their log-softmax replaces
        logprobs/ref_logprobs); give both or neither.

    Returns (rewards, non_score_rewards, kls), each [B, T]:
      kls = kl_penalty(logprobs, ref_logprobs) at EVERY position, masked or
      not (TRL 0.7.11 detail: the KL penalty is applied at every position, query and pad included; `compute_advantages` masks later); non_score_rewards =
      -kl_coef * kls (unmasked, as TRL); rewards = non_score_rewards plus
      `scores[b]` at the LAST nonzero mask index of row b (TRL 0.7.11 detail). A row
      whose mask is all zero gets no score (TRL raises an IndexError there).
    """
    mode = kl_penalty
    _check_kl_mode(mode)
    if mode != "full" and (logits is not None or ref_logits is not None):
        raise ValueError(
            f'compute_rewards: logits/ref_logits are used only with kl_penalty="full" (got {mode!r}); '
            "pass the sampled tokens' log-probs as logprobs/ref_logprobs and drop logits/ref_logits."
        )
    scores = jnp.asarray(scores)
    masks = jnp.asarray(masks)
    chex.assert_rank([scores, masks], [1, 2])
    B, T = masks.shape
    chex.assert_shape(scores, (B,))

    if mode == "full":
        if (logits is None) != (ref_logits is None):
            raise ValueError("compute_rewards: pass both `logits` and `ref_logits`, or neither.")
        if logits is not None:
            logprobs = logprobs_from_logits(logits, None, gather=False)
            ref_logprobs = logprobs_from_logits(ref_logits, None, gather=False)
        logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
        if logprobs.ndim != 3 or ref_logprobs.ndim != 3:
            raise ValueError(
                'kl_penalty="full" needs full log-prob distributions [B, T, V] '
                "(log_softmax of the logits) as logprobs/ref_logprobs, or pass "
                f"logits=/ref_logits=; got shapes {logprobs.shape} and {ref_logprobs.shape}."
            )
        chex.assert_shape([logprobs, ref_logprobs], (B, T, None))
    else:
        logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
        chex.assert_shape([logprobs, ref_logprobs], (B, T))

    kls = _kl_penalty_fn(logprobs, ref_logprobs, mode)
    non_score_rewards = -kl_coef * kls
    is_last = _last_unmasked(masks)
    rewards = jnp.where(is_last, non_score_rewards + scores[:, None], non_score_rewards)
    return rewards, non_score_rewards, kls


def compute_advantages(
    values: ArrayLike,
    rewards: ArrayLike,
    mask: ArrayLike,
    gamma: ArrayLike,
    lam: ArrayLike,
    whiten_rewards: bool = False,
) -> Tuple[Array, Array, Array]:
    """Generalised advantage estimation exactly as TRL 0.7.11 computes it.

    Args:
      values: [B, T] value-head predictions of the rollout.
      rewards: [B, T] from `compute_rewards`.
      mask: [B, T] response mask.
      gamma, lam: discount and GAE lambda (scalars, may be traced).
      whiten_rewards: (static) whiten the masked rewards first, keeping their
        mean (shift_mean=False), over the whole batch.

    Returns (values, advantages, returns), each [B, T]:
      values: the masked values (the "old values" of the value loss);
      returns: UNwhitened advantages + masked values (TRL 0.7.11 detail: advantages are whitened over the whole batch, returns are not);
      advantages: whitened over the whole batch with the masked mean and
        unbiased masked variance (every position is transformed, as TRL).
    The recursion runs over all T positions, masked ones included (TRL 0.7.11 detail; the masked positions drop out of the loss):
    masked values/rewards are zero, so query positions before the response
    carry the response's discounted advantage (they are masked out later).
    `advantages` and `returns` are wrapped in `stop_gradient` (TRL computes
    them under no_grad). Never raises (one jit-safe meaning, see `masked_var`);
    shells check concrete masks with `rljax.core.check_whiten_mask`.
    """
    values, rewards, mask = jnp.asarray(values), jnp.asarray(rewards), jnp.asarray(mask)
    chex.assert_rank(values, 2)
    chex.assert_equal_shape([values, rewards, mask])
    dtype = jnp.result_type(values.dtype, rewards.dtype, jnp.float32)
    fmask = mask.astype(dtype)
    values = values.astype(dtype) * fmask
    rewards = rewards.astype(dtype) * fmask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values
    discount = gamma * lam

    def _gae_step(lastgaelam: Array, delta_t: Array) -> Tuple[Array, Array]:
        lastgaelam = delta_t + discount * lastgaelam
        return lastgaelam, lastgaelam

    _, advantages_tm = jax.lax.scan(
        _gae_step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True
    )
    advantages = advantages_tm.T.astype(dtype)

    returns = jax.lax.stop_gradient(advantages + values)
    advantages = jax.lax.stop_gradient(masked_whiten(advantages, mask))
    return values, advantages, returns


# --------------------------------------------------------------------------
# KL controllers (pytrees)
# --------------------------------------------------------------------------


@flax.struct.dataclass
class KLControllerState:
    """The KL coefficient as a pytree.

    value: float32 scalar, the current coefficient (a leaf).
    adaptive, target, horizon: static (part of the tree structure), so a
    jitted step recompiles only if the controller kind or its settings change.
    """

    value: Array
    adaptive: bool = flax.struct.field(pytree_node=False, default=True)
    target: Optional[float] = flax.struct.field(pytree_node=False, default=None)
    horizon: Optional[float] = flax.struct.field(pytree_node=False, default=None)


def adaptive_kl_update(
    value: ArrayLike,
    current_kl: ArrayLike,
    n_steps: ArrayLike,
    target: ArrayLike,
    horizon: ArrayLike,
) -> Array:
    """Ziegler et al.'s proportional controller (TRL's AdaptiveKLController).

    error = clip(current_kl / target - 1, -0.2, 0.2);
    value * (1 + error * n_steps / horizon). All scalars. TRL feeds
    current_kl = `objective/kl` (the batch mean of per-sequence SUMMED KL)
    and n_steps = batch_size * num_processes (TRL 0.7.11 detail: per-sequence summed KL is compared with the target).
    """
    proportional_error = jnp.clip(jnp.asarray(current_kl) / target - 1, -0.2, 0.2)
    mult = 1 + proportional_error * n_steps / horizon
    return value * mult


def fixed_kl_update(value: ArrayLike, *args: Any, **kwargs: Any) -> ArrayLike:
    """TRL's FixedKLController.update: the coefficient never changes."""
    del args, kwargs
    return value


def kl_controller_init(config: "PPOConfig") -> KLControllerState:
    """Controller state from a PPOConfig (init_kl_coef, adap_kl_ctrl, target, horizon)."""
    adaptive = bool(config.adap_kl_ctrl)
    if adaptive and (config.target is None or config.horizon is None):
        raise ValueError("adap_kl_ctrl=True needs PPOConfig.target and PPOConfig.horizon.")
    return KLControllerState(
        value=jnp.asarray(config.init_kl_coef, dtype=jnp.float32),
        adaptive=adaptive,
        target=None if config.target is None else float(config.target),
        horizon=None if config.horizon is None else float(config.horizon),
    )


def kl_controller_update(
    state: KLControllerState, current_kl: ArrayLike, n_steps: ArrayLike
) -> KLControllerState:
    """One controller step (adaptive or fixed, chosen by the static flag)."""
    if state.adaptive:
        value = adaptive_kl_update(state.value, current_kl, n_steps, state.target, state.horizon)
    else:
        value = fixed_kl_update(state.value, current_kl, n_steps)
    value = jnp.asarray(value)
    return state.replace(value=value.astype(jnp.asarray(state.value).dtype))


# --------------------------------------------------------------------------
# Score preprocessing
# --------------------------------------------------------------------------


def process_scores(
    scores: ArrayLike,
    moments_state: RunningMomentsState,
    *,
    use_score_scaling: bool,
    use_score_norm: bool,
    score_clip: Optional[float],
) -> Tuple[Array, RunningMomentsState]:
    """TRL's score scaling / normalisation / clipping, as a pure function.

    scores: [B]. In TRL's order (TRL 0.7.11 detail: the running std includes the current batch):
      1. if use_score_scaling: fold `scores` into the running moments, then
         divide by (running std + float32 eps) using the UPDATED moments
         (current batch included); with use_score_norm also subtract the
         running mean first. use_score_norm alone does nothing.
      2. if score_clip is not None: clip to [-score_clip, score_clip].
    The flags and the None-ness of score_clip are static. Returns
    (scores [B] in the input's floating dtype, new moments_state); the
    moments are unchanged when use_score_scaling is False.
    """
    scores = jnp.asarray(scores)
    chex.assert_rank(scores, 1)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    dtype = scores.dtype
    if use_score_scaling:
        moments_state, _, _ = running_moments_update(moments_state, scores)
        factor = moments_state.std + jnp.finfo(jnp.float32).eps
        if use_score_norm:
            scores = (scores - moments_state.mean) / factor
        else:
            scores = scores / factor
        scores = scores.astype(dtype)
    if score_clip is not None:
        scores = jnp.clip(scores.astype(jnp.float32), -score_clip, score_clip).astype(dtype)
    return scores, moments_state


# --------------------------------------------------------------------------
# Step statistics
# --------------------------------------------------------------------------


def step_stats(
    *,
    scores: ArrayLike,
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    non_score_reward: ArrayLike,
    kls: ArrayLike,
    masks: ArrayLike,
    kl_coef: ArrayLike,
    queries_len: ArrayLike,
    responses_len: ArrayLike,
    train_stats: Optional[Mapping[str, ArrayLike]] = None,
) -> Dict[str, Array]:
    """TRL's `record_step_stats` from arrays (jittable).

    Args:
      scores: [B] scores as used for the rewards (after `process_scores`).
      logprobs, ref_logprobs: [B, T] sampled-token log-probs (rollout).
      non_score_reward, kls: [B, T] from `compute_rewards`.
      masks: [B, T] response mask.
      kl_coef: scalar, the coefficient used for this step (BEFORE the
        controller update, TRL 0.7.11 detail).
      queries_len, responses_len: [B] token counts of each query / response.
      train_stats: optional flat dict of `rljax.losses.ppo_loss` stats ALREADY
        averaged over the minibatches ("loss/policy", "val/error",
        "returns/var", ...); each is re-keyed "ppo/<key>", and
        "ppo/val/var_explained" = 1 - val/error / returns/var is added.

    Returns a dict with objective/kl (batch mean of per-sequence summed
    masked KL), objective/kl_dist [B], objective/logprobs, objective/ref_logprobs,
    objective/kl_coef, objective/entropy (batch mean of summed -logprob*mask,
    TRL 0.7.11 detail: Monte-Carlo over sampled tokens, unlike ppo/policy/entropy), ppo/mean_non_score_reward (masked mean), ppo/mean_scores,
    ppo/std_scores (unbiased), tokens/queries_len_mean, tokens/queries_len_std
    (unbiased), tokens/queries_dist [B], and the same three for responses.
    TRL's "KL is becoming negative" warning (objective/kl < -1) is host-side
    and left to the caller.
    """
    scores = jnp.asarray(scores)
    logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
    non_score_reward, kls, masks = (jnp.asarray(x) for x in (non_score_reward, kls, masks))
    chex.assert_rank([scores, logprobs, masks], [1, 2, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs, non_score_reward, kls, masks])
    B = masks.shape[0]
    queries_len = jnp.asarray(queries_len, dtype=jnp.float32)
    responses_len = jnp.asarray(responses_len, dtype=jnp.float32)
    chex.assert_shape([scores, queries_len, responses_len], (B,))

    fmask = masks.astype(jnp.result_type(kls.dtype, jnp.float32))
    kl_list = jnp.sum(kls * fmask, axis=-1)
    stats: Dict[str, Array] = {
        "objective/kl": jnp.mean(kl_list),
        "objective/kl_dist": kl_list,
        "objective/logprobs": logprobs,
        "objective/ref_logprobs": ref_logprobs,
        "objective/kl_coef": jnp.asarray(kl_coef),
        "objective/entropy": jnp.mean(jnp.sum(-logprobs * fmask, axis=-1)),
        "ppo/mean_non_score_reward": masked_mean(non_score_reward, fmask),
        "ppo/mean_scores": jnp.mean(scores),
        "ppo/std_scores": jnp.std(scores, ddof=1),
        "tokens/queries_len_mean": jnp.mean(queries_len),
        "tokens/queries_len_std": jnp.std(queries_len, ddof=1),
        "tokens/queries_dist": queries_len,
        "tokens/responses_len_mean": jnp.mean(responses_len),
        "tokens/responses_len_std": jnp.std(responses_len, ddof=1),
        "tokens/responses_dist": responses_len,
    }
    if train_stats is not None:
        for key, value in train_stats.items():
            stats[f"ppo/{key}"] = jnp.asarray(value)
        if "val/error" in train_stats and "returns/var" in train_stats:
            stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    return stats


# ==========================================================================
# 2. Host-side helpers
# ==========================================================================


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (TRL users)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def validate_scores(scores: Any, batch_size: int) -> np.ndarray:
    """Check user scores before they touch any state; return them as float32 [batch_size].

    Accepts a 1-D array of length `batch_size`, or (as TRL's `step`) a list /
    tuple of `batch_size` scalars or 0-d / single-element arrays or tensors.
    Raises ValueError for a wrong shape or length, a non-numeric dtype, or a
    NaN / inf score (which would otherwise poison the running moments and
    the parameters).
    """
    if isinstance(scores, (list, tuple)):
        if len(scores) != batch_size:
            raise ValueError(
                f"scores has {len(scores)} entries but batch_size is {batch_size}; "
                "pass one score per query/response pair."
            )
        items = []
        for i, s in enumerate(scores):
            a = _to_numpy(s)
            if a.ndim > 1 or a.size != 1:
                raise ValueError(
                    f"scores[{i}] must be a scalar (0-d, or 1-d with one element); "
                    f"got shape {a.shape}."
                )
            items.append(a.reshape(()))
        arr = np.stack(items) if items else np.zeros((0,), np.float32)
    else:
        arr = _to_numpy(scores)
        if arr.ndim != 1:
            raise ValueError(
                f"scores must be 1-D [batch_size] (or a list of scalars); got shape "
                f"{arr.shape}. Use scores.reshape(-1) if you have one score per row."
            )
        if arr.shape[0] != batch_size:
            raise ValueError(
                f"scores has {arr.shape[0]} entries but batch_size is {batch_size}; "
                "pass one score per query/response pair."
            )
    if arr.dtype.kind in "OSUVMmcb":
        raise ValueError(f"scores must be real numbers; got dtype {arr.dtype}.")
    arr = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"scores must be finite; got {arr[bad].tolist()} at indices {bad.tolist()}. "
            "Fix or filter the reward function's output (NaN/inf would corrupt the "
            "running score moments and the parameters)."
        )
    return arr


# ==========================================================================
# 3. Configuration and TRL-style shells
# ==========================================================================


def _check_accelerator_kwargs(kwargs: dict) -> None:
    """PPOConfig.accelerator_kwargs: only ``mixed_precision`` ("no" or "bf16") has an rljax meaning."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"PPOConfig.accelerator_kwargs must be a dict, got {type(kwargs).__name__}.")
    unknown = sorted(set(kwargs) - {"mixed_precision"})
    if unknown:
        raise ValueError(
            f"PPOConfig.accelerator_kwargs {unknown} have no rljax counterpart; only mixed_precision ('no' or "
            "'bf16') is supported. Devices and sharding: pass PPOTrainer(mesh=...); gradient accumulation: "
            "PPOConfig.gradient_accumulation_steps."
        )
    mixed = kwargs.get("mixed_precision", "no")
    if mixed not in ("no", "bf16"):
        hint = " (float16 needs a loss scaler; use 'bf16')" if mixed == "fp16" else ""
        raise ValueError(
            f"PPOConfig.accelerator_kwargs['mixed_precision'] must be 'no' or 'bf16', got {mixed!r}{hint}."
        )


@dataclasses.dataclass
class PPOConfig:
    """Configuration of PPOTrainer: TRL 0.7.11's fields, names and defaults.

    A plain typed dataclass, so `tyro.cli(PPOConfig)` builds a command line
    from it (runtime-filled fields are hidden from the CLI).
    """

    # ---- common parameters -------------------------------------------------
    exp_name: str = os.path.basename(sys.argv[0])[: -len(".py")]
    """Experiment name; defaults to the running script's file name without `.py`."""
    seed: int = 0
    """Seed for every random draw (parameter init, sampling, minibatch shuffling)."""
    log_with: Optional[Literal["wandb", "tensorboard", "jsonl"]] = None
    """Metric tracker to log to: "wandb", "tensorboard" or "jsonl" (None: no tracker); see rljax.logging."""
    task_name: Optional[str] = None
    """Task name; recorded for tracking only."""
    model_name: Optional[str] = "gpt2"
    """Model name; recorded for tracking only."""
    query_dataset: Optional[str] = "imdb"
    """Query dataset name; recorded for tracking only."""
    reward_model: Optional[str] = "sentiment-analysis:lvwerra/distilbert-imdb"
    """Reward model name; recorded for tracking only."""
    remove_unused_columns: bool = True
    """Drop the dataset columns the trainer does not use (for `datasets.Dataset` inputs)."""
    tracker_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra keyword arguments for the tracker (e.g. the wandb run name)."""
    accelerator_kwargs: dict = dataclasses.field(default_factory=dict)
    """What TRL forwards to its Accelerator. rljax honours ``mixed_precision``: "no" (float32) or
    "bf16" (accelerate's bf16 autocast: the policy, reference and value forward passes compute in
    bfloat16, while params, gradients, Adam state, logits, log-probs and losses stay float32);
    any other key or value is refused (devices and sharding: ``PPOTrainer(mesh=...)``)."""
    project_kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments for the tracker's project configuration (e.g. `logging_dir`)."""
    tracker_project_name: str = "trl"
    """Project name under which the tracker logs."""
    push_to_hub_if_best_kwargs: dict = dataclasses.field(default_factory=dict)
    """Keyword arguments for pushing the model to the Hub when the reward improves (e.g. repo_id)."""

    # ---- hyperparameters ---------------------------------------------------
    steps: int = 20000
    """Number of training samples to process; total_ppo_epochs = ceil(steps / batch_size)."""
    learning_rate: float = 1.41e-5
    """Adam learning rate."""
    adap_kl_ctrl: bool = True
    """Use the adaptive KL controller; otherwise the KL coefficient stays fixed."""
    init_kl_coef: Optional[float] = 0.2
    """Initial KL penalty coefficient (adaptive and fixed control)."""
    kl_penalty: Literal["kl", "abs", "mse", "full"] = "kl"
    """Per-token KL penalty: "kl" (logp - ref_logp), "abs" (|kl|), "mse" (kl**2 / 2), "full" (exact KL)."""
    target: Optional[float] = 6
    """Target KL (summed per sequence, averaged over the batch) of the adaptive controller."""
    horizon: Optional[float] = 10000
    """Horizon of the adaptive KL controller (in samples)."""
    gamma: float = 1
    """Discount factor of the advantage estimation."""
    lam: float = 0.95
    """GAE lambda of the advantage estimation."""
    cliprange: float = 0.2
    """Clipping range of the policy ratio in the PPO policy loss."""
    cliprange_value: float = 0.2
    """Clipping range of the value predictions in the value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    batch_size: int = 128
    """Number of samples per PPO step (one rollout batch)."""
    forward_batch_size: Optional[int] = None
    """DEPRECATED, use `mini_batch_size`; when set it overwrites `mini_batch_size`."""
    mini_batch_size: int = 128
    """Number of samples per optimisation minibatch (also the forward-pass chunk size)."""
    gradient_accumulation_steps: int = 1
    """Number of minibatches whose gradients are accumulated per optimizer update."""
    world_size: tyro.conf.Suppress[Optional[int]] = None
    """Number of processes in distributed training (filled in at runtime)."""
    ppo_epochs: int = 4
    """Number of optimisation epochs over each rollout batch."""
    max_grad_norm: Optional[float] = None
    """Clip gradients to this global norm (None: no clipping)."""
    optimize_cuda_cache: Optional[bool] = None
    """DEPRECATED, use `optimize_device_cache` (no effect, as in TRL 0.7.11)."""
    optimize_device_cache: Optional[bool] = False
    """Free device caches between phases (kept for compatibility; XLA manages device memory in rljax)."""
    early_stopping: bool = False
    """Stop the epochs of a step early when the policy KL gets too large."""
    target_kl: float = 1
    """Early stopping triggers when the policy KL exceeds 1.5 * target_kl."""
    compare_steps: int = 1
    """Number of steps between comparisons of the current reward with the best one so far."""
    ratio_threshold: float = 10.0
    """Skip minibatches whose mean policy ratio exceeds this (guards against loss spikes)."""
    use_score_scaling: bool = False
    """Divide scores by the running std of all scores seen so far."""
    use_score_norm: bool = False
    """Also subtract the running mean of the scores; only used with use_score_scaling."""
    score_clip: Optional[float] = None
    """Clip (possibly scaled) scores to [-score_clip, score_clip] (None: no clipping)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (keeping their mean) before computing advantages."""

    # ---- filled in at runtime (hidden from the CLI) ------------------------
    is_encoder_decoder: tyro.conf.Suppress[Optional[bool]] = None
    """Runtime: whether the model is an encoder-decoder."""
    is_peft_model: tyro.conf.Suppress[Optional[bool]] = None
    """Runtime: whether the model carries adapters (the reference is the policy with adapters off)."""
    backward_batch_size: tyro.conf.Suppress[Optional[int]] = None
    """Runtime: samples per optimizer update, mini_batch_size * gradient_accumulation_steps."""
    global_backward_batch_size: tyro.conf.Suppress[Optional[int]] = None
    """Runtime: backward_batch_size * world_size."""
    global_batch_size: tyro.conf.Suppress[Optional[int]] = None
    """Runtime: batch_size * world_size."""

    def __post_init__(self) -> None:
        if self.optimize_cuda_cache is not None:
            warnings.warn(
                "`optimize_cuda_cache` is deprecated and has no effect (as in TRL 0.7.11); "
                "use `optimize_device_cache` instead.",
                FutureWarning,
                stacklevel=3,
            )
        if self.forward_batch_size is not None:
            warnings.warn(
                "`forward_batch_size` is deprecated; use `mini_batch_size` instead. "
                f"Setting it overwrites mini_batch_size ({self.mini_batch_size} -> "
                f"{self.forward_batch_size}), which sets both the forward-pass chunk "
                "size and the PPO minibatch size.",
                FutureWarning,
                stacklevel=3,
            )
            self.mini_batch_size = self.forward_batch_size

        _check_kl_mode(self.kl_penalty)
        _check_accelerator_kwargs(self.accelerator_kwargs)
        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}.")
        if self.world_size is not None and self.world_size <= 0:
            raise ValueError(f"PPOConfig.world_size must be positive, got {self.world_size!r}.")
        if self.adap_kl_ctrl:
            for name in ("target", "horizon"):
                value = getattr(self, name)
                if value is None or value <= 0:
                    raise ValueError(
                        f"PPOConfig.{name} must be positive with adap_kl_ctrl=True, got {value!r}; "
                        "set it, or use adap_kl_ctrl=False for a fixed KL coefficient."
                    )
        if self.init_kl_coef is None:
            raise ValueError("PPOConfig.init_kl_coef must be a number (use 0.0 for no KL penalty).")

        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % self.backward_batch_size != 0:
            lower = (self.batch_size // self.backward_batch_size) * self.backward_batch_size
            upper = lower + self.backward_batch_size
            hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be a multiple of "
                f"`mini_batch_size * gradient_accumulation_steps` "
                f"({self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{self.backward_batch_size}); e.g. set batch_size={hint}, or pick a "
                "mini_batch_size / gradient_accumulation_steps that divides it."
            )
        if self.world_size is not None:
            self.global_backward_batch_size = self.backward_batch_size * self.world_size
            self.global_batch_size = self.batch_size * self.world_size

        if self.use_score_norm and not self.use_score_scaling:
            warnings.warn(
                "use_score_norm=True has no effect without use_score_scaling=True; "
                "set use_score_scaling=True to normalise scores.",
                UserWarning,
                stacklevel=3,
            )
        if self.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ImportError("log_with='wandb' needs wandb: `pip install wandb`, or set log_with=None.")

        self.total_ppo_epochs = int(math.ceil(self.steps / self.batch_size))

    def to_dict(self) -> Dict[str, Any]:
        """All attributes (incl. runtime ones) as one flat dict; nested dicts use "/" keys."""
        return flatten_dict(dict(self.__dict__))


class _KLControllerShell:
    """A mutable holder of a `KLControllerState` with TRL's controller interface."""

    state: KLControllerState

    @property
    def value(self) -> float:
        return float(self.state.value)

    @value.setter
    def value(self, new_value: float) -> None:
        self.state = self.state.replace(value=jnp.asarray(new_value, dtype=jnp.float32))

    def update(self, current: ArrayLike, n_steps: ArrayLike) -> None:
        """Advance the coefficient (see `kl_controller_update`)."""
        self.state = kl_controller_update(self.state, current, n_steps)


class AdaptiveKLController(_KLControllerShell):
    """TRL-style adaptive KL controller: `.value` and `.update(current, n_steps)`.

    A thin shell over `KLControllerState` / `kl_controller_update` (the state
    is in `.state`); `.value` is a python float.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.state = KLControllerState(
            value=jnp.asarray(init_kl_coef, dtype=jnp.float32),
            adaptive=True,
            target=float(target),
            horizon=float(horizon),
        )

    @property
    def target(self) -> float:
        return self.state.target

    @property
    def horizon(self) -> float:
        return self.state.horizon


class FixedKLController(_KLControllerShell):
    """TRL-style fixed KL controller: `.update` leaves `.value` unchanged."""

    def __init__(self, kl_coef: float):
        self.state = KLControllerState(
            value=jnp.asarray(kl_coef, dtype=jnp.float32), adaptive=False
        )


__all__ = [
    "KL_PENALTY_MODES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLControllerState",
    "PPOConfig",
    "adaptive_kl_update",
    "compute_advantages",
    "compute_rewards",
    "fixed_kl_update",
    "kl_controller_init",
    "kl_controller_update",
    "kl_penalty",
    "process_scores",
    "step_stats",
    "validate_scores",
]
