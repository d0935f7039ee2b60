"""RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019) as pure, jitted functions.

REINFORCE with ``rloo_k`` samples per prompt and a leave-one-out baseline, as TRL's
``RLOOTrainer`` (v0.19, the on-policy trainer with ``rloo_k`` and ``kl_coef``):

1. ``RLOOSettings``: the algorithm's knobs (TRL's ``RLOOConfig`` names and defaults).
2. ``make_rloo_rollout``: each prompt repeated ``rloo_k`` times (the group's rows contiguous),
   one generate call, the rollout policy's and the reference's log-probs (no reference forward
   when ``kl_coef == 0``).
3. ``rloo_advantages``: the KL folded into the reward, ``R_i = score_i - kl_coef * sum_t kl_it``
   (per token or per sequence: the same sequence return), optional score normalisation and
   clipping (``normalize_reward``), the baseline ``b_i = (sum_j R_j - R_i) / (k - 1)`` of the
   other samples of the same prompt, optional whitening (``normalize_advantage``).
4. ``rloo_loss``: PPO's clipped objective on the SEQUENCE ratio ``exp(sum_t (logp - logp_old))``.
5. ``make_rloo_step``: ``num_ppo_epochs`` x ``num_mini_batches`` updates, each averaging
   ``gradient_accumulation_steps`` micro-batches; ``make_train``: the loop in one ``lax.scan``.

Shapes: ``Bp`` prompts, ``k = rloo_k``, ``B = Bp * k`` completions, ``P`` prompt length
(left-padded), ``N`` completion length (right-padded after eos). TRL stacks the ``k`` copies
as ``[k, Bp]`` (``queries.repeat(k, 1)``); rljax keeps a prompt's samples contiguous, ``[Bp, k]``:
the same advantages, row order aside.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from rljax.rollout import PolicyTrainState, check_temperature, response_logprobs, sample_groups
from rljax.sharding import constrain_batch

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RLOOSettings:
    """The algorithm's settings (hashable compile-time constants). ``batch_size`` completions per
    rollout (``B = prompts * rloo_k``), cut into ``num_mini_batches`` updates of
    ``gradient_accumulation_steps`` micro-batches per epoch. Names/defaults: TRL's ``RLOOConfig``."""

    rloo_k: int = 2
    """Completions sampled per prompt (the leave-one-out group)."""
    batch_size: int = 64
    """Completions per rollout (B): a multiple of rloo_k."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs are those of softmax(logits / temperature) (must equal generate_fn's)."""
    kl_coef: float = 0.05
    """KL coefficient of the penalty folded into the reward; 0 runs no reference forward."""
    cliprange: float = 0.2
    """Clipping range of the sequence importance ratio."""
    num_ppo_epochs: int = 4
    """Passes over each rollout."""
    num_mini_batches: int = 1
    """Optimizer updates per pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches averaged per optimizer update."""
    normalize_reward: bool = False
    """Standardise the scores over the batch, then clip them to +-reward_clip_range."""
    reward_clip_range: float = 10.0
    """Clip range of normalised scores."""
    normalize_advantage: bool = False
    """Whiten the advantages over the batch."""
    token_level_kl: bool = False
    """KL as a per-token reward (True) or one sequence-level penalty (the same return)."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of completions without eos (None: off)."""

    def __post_init__(self) -> None:
        if self.rloo_k < 2:
            raise ValueError(f"rloo_k must be >= 2 (the leave-one-out baseline needs two samples), got {self.rloo_k}.")
        if self.batch_size % self.rloo_k:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of rloo_k={self.rloo_k}.")
        per = self.num_mini_batches * self.gradient_accumulation_steps
        if self.batch_size % per:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of num_mini_batches * gradient_accumulation_steps = {per}."
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (RLOO samples), got {self.temperature}.")
        if self.num_ppo_epochs < 1 or self.cliprange <= 0 or self.kl_coef < 0:
            raise ValueError("num_ppo_epochs must be >= 1, cliprange > 0 and kl_coef >= 0.")

    @property
    def num_prompts(self) -> int:
        return self.batch_size // self.rloo_k


RLOOTrainState = PolicyTrainState  # shared with the other critic-free loop (rljax.rollout)

@flax.struct.dataclass
class RLOOBatch:
    """One rollout; rows ``g*k .. g*k+k-1`` are the samples of prompt ``g``."""

    prompts: Array  # [B, P]
    prompt_mask: Array  # [B, P]
    completions: Array  # [B, N]
    completion_mask: Array  # [B, N] int32, 1 up to and including the first eos
    contains_eos: Array  # [B] bool
    logprobs: Array  # [B, N] rollout policy ("old"), 0 where masked
    ref_logprobs: Array  # [B, N] reference (= logprobs when kl_coef == 0: no reference forward)


def make_rloo_rollout(
    module: Any,
    generate_fn: Callable,
    settings: RLOOSettings,
    *,
    ref_module: Optional[Any] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Callable:
    """``rollout(state, prompts [Bp, P], prompt_mask [Bp, P], rng) -> RLOOBatch`` (pure; jit it).
    ``generate_fn(params, ids, mask, rng)`` as ``rljax.generation.make_generate_fn(..., jit=False)``;
    ``eos_token_id`` (None: a completion that stops before the last slot counts as ended) feeds
    ``missing_eos_penalty``."""
    k, T = settings.rloo_k, settings.temperature
    ref_module = module if ref_module is None else ref_module
    check_temperature(generate_fn, T, "RLOOSettings")

    def rollout(state: Any, prompts: Array, prompt_mask: Array, rng: Array) -> RLOOBatch:
        prompts, prompt_mask, completions, mask = sample_groups(generate_fn, state.params, prompts, prompt_mask, k, rng)
        fmask = mask.astype(jnp.float32)
        logprobs = response_logprobs(module, state.params, prompts, prompt_mask, completions, mask,
                                     chunk_size=chunk_size, temperature=T).logprobs * fmask
        if settings.kl_coef != 0.0:
            ref_p = state.params if state.ref_params is None else state.ref_params
            ref = response_logprobs(ref_module, ref_p, prompts, prompt_mask, completions, mask,
                                    chunk_size=chunk_size, temperature=T).logprobs * fmask
        else:
            ref = logprobs
        if eos_token_id is None:
            ended = mask[:, -1] == 0
        else:
            eos = jnp.asarray([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), jnp.int32)
            ended = jnp.any(jnp.isin(completions, eos) & (mask > 0), axis=1)
        return RLOOBatch(prompts=prompts, prompt_mask=prompt_mask, completions=completions, completion_mask=mask,
                         contains_eos=ended, logprobs=jax.lax.stop_gradient(logprobs),
                         ref_logprobs=jax.lax.stop_gradient(ref))

    return rollout


def rloo_advantages(
    scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, settings: RLOOSettings,
    contains_eos: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Array]]:
    """Leave-one-out advantages [B] of ``scores`` [B] with the KL to the reference in the reward.

    ``kl_t = logprobs_t - ref_logprobs_t`` on ``mask`` [B, N]; ``R = score - kl_coef * sum_t kl_t``
    (``token_level_kl``: a per-token reward ``-kl_coef * kl_t`` plus the score on the last token,
    summed: the same ``R``); ``A_i = R_i - mean_{j != i} R_j`` within each group of ``rloo_k``
    contiguous rows; ``normalize_advantage`` whitens ``A`` over the batch (unbiased std + 1e-8).
    Returns ``(advantages, parts)`` with ``scores`` (after penalty/normalisation), ``kl`` [B]
    (sum over tokens), ``non_score_reward`` [B] and ``rlhf_reward`` [B]."""
    s = settings
    scores = jnp.asarray(scores, jnp.float32)
    chex.assert_rank(scores, 1)
    fmask = mask.astype(jnp.float32)
    if s.missing_eos_penalty is not None and contains_eos is not None:
        scores = scores - s.missing_eos_penalty * (~contains_eos).astype(jnp.float32)
    if s.normalize_reward:
        scores = (scores - scores.mean()) / (scores.std(ddof=1) + 1e-8)
        scores = jnp.clip(scores, -s.reward_clip_range, s.reward_clip_range)
    kl = (logprobs - ref_logprobs) * fmask  # [B, N]
    if s.token_level_kl:
        kl_reward = -s.kl_coef * kl
        last = jax.nn.one_hot(jnp.sum(fmask, -1).astype(jnp.int32) - 1, kl.shape[1], dtype=jnp.float32)
        non_score = kl_reward.sum(1)
        rlhf_reward = (kl_reward + scores[:, None] * last).sum(1)
    else:
        non_score = -s.kl_coef * kl.sum(1)
        rlhf_reward = scores + non_score
    groups = rlhf_reward.reshape(-1, s.rloo_k)
    baseline = (groups.sum(1, keepdims=True) - groups) / (s.rloo_k - 1)
    advantages = (groups - baseline).reshape(-1)
    if s.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std(ddof=1) + 1e-8)
    return advantages, {"scores": scores, "kl": kl.sum(1), "non_score_reward": non_score, "rlhf_reward": rlhf_reward}


def rloo_loss(
    logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, cliprange: float,
    entropy: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Array]]:
    """TRL's RLOO policy loss of one micro-batch: the sequence ratio ``r = exp(sum_t (logprobs -
    old_logprobs) * mask)`` ([b, N] inputs, ``advantages`` [b]), ``mean(max(-A r, -A clip(r, 1 -
    eps, 1 + eps)))``. Metrics: ``pg_clipfrac``, ``approxkl`` (``0.5 * mean(diff**2)``), ``ratio``
    (mean per-token ratio on the mask), ``entropy`` (masked mean, when given)."""
    fmask = mask.astype(jnp.float32)
    diff_t = (logprobs - old_logprobs) * fmask
    diff = diff_t.sum(1)
    ratio = jnp.exp(diff)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = jnp.maximum(pg1, pg2).mean()
    count = jnp.maximum(fmask.sum(), 1.0)
    metrics = {
        "pg_clipfrac": (pg2 > pg1).astype(jnp.float32).mean(),
        "approxkl": 0.5 * jnp.mean(diff ** 2),
        "ratio": (jnp.exp(diff_t) * fmask).sum() / count,
        "entropy": (entropy * fmask).sum() / count if entropy is not None else jnp.zeros((), jnp.float32),
    }
    return loss, metrics


def make_rloo_step(module: Any, settings: RLOOSettings, tx: optax.GradientTransformation, *,
                   mesh: Optional[Any] = None) -> Callable:
    """``rloo_step(state, batch: RLOOBatch, scores [B]) -> (state, stats)`` (pure; jit it).

    ``num_ppo_epochs`` epochs, each a fresh permutation cut into ``num_mini_batches`` updates
    (``tx``, closed over) of averaged gradients over ``gradient_accumulation_steps`` micro-batches.
    ``stats`` (TRL's keys): ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
    ``objective/rlhf_reward``, ``objective/scores``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
    ``loss/policy_avg``, ``policy/entropy_avg``, ``val/ratio``, ``val/ratio_var``,
    ``val/num_eos_tokens``, plus ``reward``, ``reward_std``, ``kl``, ``completion_length``,
    ``clip_ratio`` (the common names of the GRPO shell)."""
    s = settings
    B, M, GA = s.batch_size, s.num_mini_batches, s.gradient_accumulation_steps
    mb = B // (M * GA)

    def loss_fn(params, micro):
        scores = response_logprobs(module, params, micro["prompts"], micro["prompt_mask"], micro["completions"],
                                   micro["completion_mask"], return_entropy=True, temperature=s.temperature)
        return rloo_loss(scores.logprobs, micro["logprobs"], micro["advantages"], micro["completion_mask"],
                         s.cliprange, entropy=scores.entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(carry, micros):
        params, opt_state = carry

        def accumulate(grads_acc, micro):
            micro = constrain_batch(micro, mesh)
            (loss, metrics), grads = grad_fn(params, micro)
            return jax.tree_util.tree_map(jnp.add, grads_acc, grads), dict(metrics, loss=loss)

        grads, metrics = jax.lax.scan(accumulate, jax.tree_util.tree_map(jnp.zeros_like, params), micros)
        grads = jax.tree_util.tree_map(lambda g: g / GA, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def rloo_step(state: RLOOTrainState, batch: RLOOBatch, scores: Array):
        scores = jnp.asarray(scores, jnp.float32)
        chex.assert_shape(scores, (B,))
        chex.assert_shape(batch.completions, (B, None))
        advantages, parts = rloo_advantages(scores, batch.logprobs, batch.ref_logprobs, batch.completion_mask, s,
                                            batch.contains_eos)
        data = dict(prompts=batch.prompts, prompt_mask=batch.prompt_mask, completions=batch.completions,
                    completion_mask=batch.completion_mask, logprobs=batch.logprobs, advantages=advantages)
        rng, key = jax.random.split(state.rng)

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, B)
            split = jax.tree_util.tree_map(lambda x: x[perm].reshape(M, GA, mb, *x.shape[1:]), data)
            return jax.lax.scan(update, carry, constrain_batch(split, mesh, batch_axis=2))

        (params, opt_state), m = jax.lax.scan(
            epoch, (state.params, state.opt_state), jax.random.split(key, s.num_ppo_epochs)
        )
        fmask = batch.completion_mask.astype(jnp.float32)
        stats = {
            "objective/kl": parts["kl"].mean(),
            "objective/entropy": (-batch.logprobs * fmask).sum(1).mean(),
            "objective/non_score_reward": parts["non_score_reward"].mean(),
            "objective/rlhf_reward": parts["rlhf_reward"].mean(),
            "objective/scores": parts["scores"].mean(),
            "policy/approxkl_avg": m["approxkl"].mean(),
            "policy/clipfrac_avg": m["pg_clipfrac"].mean(),
            "loss/policy_avg": m["loss"].mean(),
            "policy/entropy_avg": m["entropy"].mean(),
            "val/ratio": m["ratio"].mean(),
            "val/ratio_var": m["ratio"].var(ddof=1) if m["ratio"].size > 1 else jnp.zeros((), jnp.float32),
            "val/num_eos_tokens": batch.contains_eos.astype(jnp.float32).sum(),
            "reward": scores.mean(),
            "reward_std": scores.std(ddof=1),
            "kl": parts["kl"].mean(),
            "completion_length": fmask.sum(1).mean(),
            "clip_ratio": m["pg_clipfrac"].mean(),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), stats

    return rloo_step


def make_train(
    module: Any,
    settings: RLOOSettings,
    generate_fn: Callable,
    reward_fn: Callable,
    num_steps: int,
    tx: optax.GradientTransformation,
    *,
    ref_module: Optional[Any] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Callable:
    """``train(state, reward_params, prompts, prompt_mask) -> (state, stats)``: ``num_steps`` RLOO
    iterations in one ``lax.scan`` (PPO's and GRPO's convention: reward params and the
    left-padded prompt bank [num_prompts, P] are arguments). ``reward_fn(reward_params, RLOOBatch)
    -> [B]``. Prompts: epochs over the bank without replacement, one permutation per epoch.
    ``stats``: ``rloo_step``'s, each ``[num_steps]``. ``jax.vmap(train, in_axes=(0, None, None,
    None))`` trains several seeds at once."""
    Bp, B = settings.num_prompts, settings.batch_size
    rollout_fn = make_rloo_rollout(module, generate_fn, settings, ref_module=ref_module, eos_token_id=eos_token_id,
                                   chunk_size=chunk_size)
    rloo_step = make_rloo_step(module, settings, tx)

    def train(state: RLOOTrainState, reward_params: Any, prompts: Array, prompt_mask: Array):
        chex.assert_rank([prompts, prompt_mask], 2)
        chex.assert_equal_shape([prompts, prompt_mask])
        n = prompts.shape[0]
        if n < Bp:
            raise ValueError(f"The prompt bank has {n} prompts, fewer than batch_size / rloo_k = {Bp}.")
        per_epoch = n // Bp
        rng, bank_key = jax.random.split(state.rng)
        state = state.replace(rng=rng)

        def _update_step(state, i):
            order = jax.random.permutation(jax.random.fold_in(bank_key, i // per_epoch), n)
            idx = jax.lax.dynamic_slice_in_dim(order, (i % per_epoch) * Bp, Bp)
            rng, k_gen = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            batch = rollout_fn(state, prompts[idx], prompt_mask[idx], k_gen)
            scores = reward_fn(reward_params, batch)
            if jnp.shape(scores) != (B,):
                raise ValueError(f"reward_fn must return shape ({B},); it returned {jnp.shape(scores)}.")
            return rloo_step(state, batch, scores)

        return jax.lax.scan(_update_step, state, jnp.arange(num_steps))

    return train


make_rloo_train = make_train  # the name rljax exports at top level (rljax.make_rloo_train)

__all__ = [
    "RLOOBatch",
    "RLOOSettings",
    "RLOOTrainState",
    "make_rloo_rollout",
    "make_rloo_step",
    "make_train",
    "make_rloo_train",
    "rloo_advantages",
    "rloo_loss",
]
