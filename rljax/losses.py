"""Pure, jittable losses: SFT, reward modelling, DPO and PPO (TRL 0.7.11 math).

Shapes: `[batch, seq]` unless stated; `V` is the vocabulary size. String and
boolean options (`loss_type`, `reference_free`, `average_log_prob`) are
Python values fixed at trace time; numeric options (beta, cliprange, ...)
may be traced.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from rljax.core import (
    ArrayLike,
    _at_least_f32,
    _floating,
    _masked_var_guarded,
    clip_by_value,
    entropy_from_logits,
)

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")


# --------------------------------------------------------------------------
# Token log-likelihoods
# --------------------------------------------------------------------------


def _shifted_token_logps(logits: Array, labels: Array, ignore_index: int, shift: bool = True) -> Tuple[Array, Array]:
    """Log-prob of labels[:, 1:] under logits[:, :-1] (``shift=False``: of labels[:, t] under
    logits[:, t], an encoder-decoder's decoder), and the not-ignored mask.

    Returns (per_token_logps, loss_mask), both [batch, seq-1] ([batch, seq] unshifted); ignored
    positions hold an arbitrary finite value in per_token_logps.
    """
    logits, labels = _at_least_f32(logits), jnp.asarray(labels)
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    loss_mask = labels != ignore_index
    safe_labels = jnp.where(loss_mask, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    per_token = picked - jax.nn.logsumexp(logits, axis=-1)
    return per_token, loss_mask.astype(per_token.dtype)


def _check_logits_labels(logits: Array, labels: Array) -> None:
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            "Logits (batch and sequence length dim) and labels must have the same shape, "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )


def get_batch_logps(
    logits: ArrayLike,
    labels: ArrayLike,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    is_encoder_decoder: bool = False,
) -> Array:
    """Sequence log-probability of `labels` (TRL's DPO ``get_batch_logps``).

    logits: [batch, seq, V]; labels: [batch, seq] with `label_pad_token_id` on
    positions that do not count (prompt, padding). Decoder-only, labels are shifted by one:
    logits[:, :-1] score labels[:, 1:]; `is_encoder_decoder` (TRL's flag): no shift,
    logits[:, t] scores labels[:, t]. Returns [batch]: the sum of token
    log-probs, or their mean over counted tokens when `average_log_prob`
    (a row with no counted token then gives NaN, as in TRL).
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits_labels(logits, labels)
    per_token, loss_mask = _shifted_token_logps(logits, labels, label_pad_token_id, shift=not is_encoder_decoder)
    total = jnp.sum(per_token * loss_mask, axis=-1)
    if average_log_prob:
        return total / jnp.sum(loss_mask, axis=-1)
    return total


def sft_loss_and_count(
    logits: ArrayLike, labels: ArrayLike, ignore_index: int = -100
) -> Tuple[Array, Array]:
    """Next-token cross-entropy (mean over counted tokens) and the token count.

    HF causal-LM convention: logits[:, :-1] predict labels[:, 1:]; labels equal
    to `ignore_index` do not count. Returns (loss, num_tokens), both scalars;
    `loss * num_tokens` is the summed NLL (for token-weighted accumulation).
    Deliberate difference from torch's cross_entropy: when no token counts,
    the loss is 0 (not NaN), so an all-padding micro-batch cannot poison a
    jitted step.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits_labels(logits, labels)
    per_token, loss_mask = _shifted_token_logps(logits, labels, ignore_index)
    count = jnp.sum(loss_mask)
    nll_sum = -jnp.sum(per_token * loss_mask)
    return nll_sum / jnp.maximum(count, 1.0), count


def sft_loss(logits: ArrayLike, labels: ArrayLike, ignore_index: int = -100) -> Array:
    """Scalar next-token cross-entropy; see `sft_loss_and_count`."""
    return sft_loss_and_count(logits, labels, ignore_index)[0]


# --------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------


def _as_per_pair(x: ArrayLike, name: str) -> Array:
    """[B] or [B, 1] -> [B]."""
    x = _floating(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape [batch] or [batch, 1], got {tuple(x.shape)}")
    return x


def reward_loss(
    chosen_rewards: ArrayLike, rejected_rewards: ArrayLike, margin: Optional[ArrayLike] = None
) -> Array:
    """Pairwise (Bradley-Terry) reward-model loss: mean of -log_sigmoid(rc - rr - margin).

    chosen_rewards, rejected_rewards: [batch] or [batch, 1] (a reward head's
    output); margin: None, a scalar, [batch] or [batch, 1]. Returns a scalar.
    Deliberate fix of TRL 0.7.11: the margin is applied PER PAIR. TRL
    subtracts a [B] margin from [B, 1] rewards, which broadcasts to a [B, B]
    matrix and averages every pair against every margin.
    """
    rc = _as_per_pair(chosen_rewards, "chosen_rewards")
    rr = _as_per_pair(rejected_rewards, "rejected_rewards")
    chex.assert_equal_shape([rc, rr])
    diff = rc - rr
    if margin is not None:
        margin = _floating(margin)
        if margin.ndim > 0:
            margin = _as_per_pair(margin, "margin")
            chex.assert_equal_shape([margin, diff])
        diff = diff - margin
    return jnp.mean(-jax.nn.log_sigmoid(diff))


# --------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    reference_free: bool = False,
) -> Tuple[Array, Array, Array]:
    """TRL 0.7.11's DPO family of losses on sequence log-probs (all [batch]).

    loss_type:
      * "sigmoid": -log_sigmoid(beta*h)*(1-ls) - log_sigmoid(-beta*h)*ls
      * "hinge":   relu(1 - beta*h)
      * "ipo":     (h - 1/(2*beta))**2  (TRL feeds it length-AVERAGED logps:
                   call get_batch_logps(..., average_log_prob=True))
      * "kto_pair": 2B losses, chosen half then rejected half, with batch-mean
                   KL estimates clamped at 0 (ignores reference_free)
    where h = (pc - pr) - (rc - rr), or (pc - pr) when reference_free.
    label_smoothing is only used by "sigmoid" (ignored otherwise, as TRL).
    Returns (losses [batch] or [2*batch] for kto_pair, chosen_rewards,
    rejected_rewards); the rewards are beta * (policy - reference) logps,
    always with the reference (even when reference_free), gradient-stopped.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type!r}. Should be one of {list(DPO_LOSS_TYPES)}")
    if (
        loss_type != "sigmoid"
        and isinstance(label_smoothing, (int, float))
        and label_smoothing > 0
    ):
        warnings.warn(f"label_smoothing is ignored by the {loss_type!r} DPO loss.", stacklevel=2)

    pc, pr, rc, rr = (
        _floating(x)
        for x in (
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
        )
    )
    chex.assert_rank([pc, pr, rc, rr], 1)
    chex.assert_equal_shape([pc, pr, rc, rr])

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    pi_logratios = pc - pr
    logits = pi_logratios if reference_free else pi_logratios - (rc - rr)

    if loss_type == "sigmoid":
        losses = (
            -jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = jnp.square(logits - 1 / (2 * beta))
    else:  # kto_pair: each half's KL term is estimated from the other half.
        chosen_kl = jnp.maximum(jnp.mean(chosen_logratios), 0.0)
        rejected_kl = jnp.maximum(jnp.mean(rejected_logratios), 0.0)
        losses = jnp.concatenate(
            [
                1 - jax.nn.sigmoid(beta * (chosen_logratios - rejected_kl)),
                1 - jax.nn.sigmoid(beta * (chosen_kl - rejected_logratios)),
            ],
            axis=0,
        )

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------


def _masked_mean_guarded(values: Array, mask: Array) -> Array:
    """masked_mean over all elements; 0 (not NaN) for an empty mask."""
    mask_sum = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.where(mask_sum > 0, mask_sum, 1.0)


def ppo_loss(
    old_logprobs: ArrayLike,
    values: ArrayLike,
    logits: ArrayLike,
    vpreds: ArrayLike,
    logprobs: ArrayLike,
    mask: ArrayLike,
    advantages: ArrayLike,
    returns: ArrayLike,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    ratio_threshold: float = 10.0,
    entropy: Optional[ArrayLike] = None,
) -> Tuple[Array, Array, Dict[str, Array]]:
    """TRL 0.7.11's `PPOTrainer.loss`: clipped policy and value losses.

    old_logprobs, values (rollout values), vpreds, logprobs, mask, advantages,
    returns: [batch, seq]; logits: [batch, seq, V], or [batch, V] (one distribution per
    row, as TRL broadcasts a rank-2 entropy), for the entropy stat only.
    ``entropy`` [batch, seq] (optional): the per-token entropy already computed with the
    log-probs (``rljax.core.logprobs_and_entropy``); then ``logits`` is not read and may be None.
    Returns (pg_loss, vf_coef * vf_loss, stats); optimise their sum.

    stats holds TRL's flattened keys: loss/policy, loss/value (UNscaled
    vf_loss), loss/total, policy/{entropy, approxkl, policykl, clipfrac,
    advantages [batch, seq], advantages_mean, ratio [batch, seq]},
    returns/{mean, var}, val/{vpred, error, clipfrac, mean, var}, plus
    `skipped` (1.0 / 0.0, not in TRL).

    When the masked mean ratio exceeds `ratio_threshold` (or is NaN, our
    addition), pg_loss, vf_loss and loss/total are 0 (as TRL) and
    stats["skipped"] is 1.0. Deliberate fix: the caller must then leave params
    and optimizer state untouched (TRL still steps Adam). The gradients of a
    skipped batch are exactly zero, and finite even when the ratio overflowed.

    jit safety: the variances use the guarded masked_var (biased where the
    unbiased correction is undefined), and every masked mean returns 0 for an
    empty mask, so this never raises or returns NaN for finite inputs (TRL
    raises on an empty mask and returns NaN variances for a one-token mask).
    """
    old_logprobs, values, vpreds, logprobs, advantages, returns = (
        _floating(x) for x in (old_logprobs, values, vpreds, logprobs, advantages, returns)
    )
    chex.assert_rank([old_logprobs, values, vpreds, logprobs, advantages, returns], 2)
    chex.assert_equal_shape([old_logprobs, values, vpreds, logprobs, advantages, returns])
    if entropy is None:
        logits = jnp.asarray(logits)
        chex.assert_rank(logits, {2, 3})
        chex.assert_equal_shape_prefix([logits, logprobs], logits.ndim - 1)
    else:
        entropy = _floating(entropy)
        chex.assert_equal_shape([entropy, logprobs])
    mask = jnp.asarray(mask, dtype=logprobs.dtype)
    chex.assert_equal_shape([mask, logprobs])

    def mmean(x: Array) -> Array:
        return _masked_mean_guarded(x, mask)

    vpredclipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = jnp.square(vpreds - returns)
    vf_losses2 = jnp.square(vpredclipped - returns)
    vf_loss = 0.5 * mmean(jnp.maximum(vf_losses1, vf_losses2))
    vf_clipfrac = mmean((vf_losses2 > vf_losses1).astype(mask.dtype))

    sg = jax.lax.stop_gradient
    ratio = jnp.exp(logprobs - old_logprobs)
    # Skip an exploded batch without a Python branch. Written as "not <=" so a
    # NaN mean ratio (an overflowed exp: inf * 0 at masked positions) also
    # skips. The loss of a skipped batch is built from ratio 1 (logprobs
    # swapped for old_logprobs), so its gradients are exactly 0, never NaN,
    # and where() hides an inf/NaN loss that TRL's `loss * 0.0` would keep.
    skipped = jnp.logical_not(sg(mmean(ratio)) <= ratio_threshold)
    loss_ratio = jnp.exp(jnp.where(skipped, sg(old_logprobs), logprobs) - old_logprobs)

    def surrogates(r: Array) -> Tuple[Array, Array]:
        return -advantages * r, -advantages * jnp.clip(r, 1.0 - cliprange, 1.0 + cliprange)

    pg_losses, pg_losses2 = surrogates(loss_ratio)
    pg_loss = mmean(jnp.maximum(pg_losses, pg_losses2))
    # The clip fraction reports the real ratio (equal to loss_ratio unless skipped).
    real_losses, real_losses2 = surrogates(ratio)
    pg_clipfrac = mmean((real_losses2 > real_losses).astype(mask.dtype))

    loss = pg_loss + vf_coef * vf_loss
    pg_loss = jnp.where(skipped, 0.0, pg_loss)
    vf_loss = jnp.where(skipped, 0.0, vf_loss)
    loss = jnp.where(skipped, 0.0, loss)

    if entropy is not None:
        token_entropy = sg(entropy)
    else:
        token_entropy = entropy_from_logits(sg(logits))  # [batch, seq], or [batch] for rank-2 logits
        if logits.ndim == 2:  # one distribution per row, shared by the row's tokens
            token_entropy = jnp.broadcast_to(token_entropy[:, None], mask.shape)
    entropy = mmean(token_entropy)
    approxkl = 0.5 * mmean(jnp.square(logprobs - old_logprobs))
    policykl = mmean(old_logprobs - logprobs)

    stats = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "loss/total": loss,
        "policy/entropy": entropy,
        "policy/approxkl": approxkl,
        "policy/policykl": policykl,
        "policy/clipfrac": pg_clipfrac,
        "policy/advantages": advantages,
        "policy/advantages_mean": mmean(advantages),
        "policy/ratio": ratio,
        "returns/mean": mmean(returns),
        "returns/var": _masked_var_guarded(returns, mask, unbiased=True),
        "val/vpred": mmean(vpreds),
        "val/error": mmean(vf_losses1),
        "val/clipfrac": vf_clipfrac,
        "val/mean": mmean(values),
        "val/var": _masked_var_guarded(values, mask, unbiased=True),
        "skipped": skipped.astype(jnp.float32),
    }
    stats = jax.tree_util.tree_map(sg, stats)
    return pg_loss, vf_coef * vf_loss, stats


__all__ = [
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "get_batch_logps",
    "ppo_loss",
    "reward_loss",
    "sft_loss",
    "sft_loss_and_count",
]
