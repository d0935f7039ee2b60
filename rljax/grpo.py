"""GRPO (Shao et al. 2024, DeepSeekMath) as pure, jitted functions over a ``GRPOTrainState``.

Read top to bottom, like the algorithm (names and defaults as later TRL's ``GRPOTrainer``):

1. ``GRPOSettings``: the algorithm's knobs (``num_generations``, ``beta``, ``epsilon``, ...).
2. ``make_grpo_rollout``: each prompt repeated ``num_generations`` times (rows of one group are
   contiguous, TRL's ``repeat_interleave``), one generate call, then the log-probs the loss
   needs: the "old" policy's (only when a rollout feeds more than one update) and the
   reference's (only when ``beta != 0``: ``beta = 0`` runs no reference forward at all).
3. ``combine_rewards`` / ``group_advantages``: weighted sum of several reward functions (NaN
   = "not applicable", as TRL's ``nansum``); ``A_i = (r_i - mean_group) / (std_group + 1e-4)``
   (``scale_rewards``; the std is torch's unbiased one).
4. ``grpo_loss``: the clipped surrogate with ``epsilon`` / ``epsilon_high`` (and ``delta``),
   token- or sequence-level importance weights, ``beta * k3`` KL to the reference, aggregated
   as ``grpo`` (per-sequence mean), ``bnpo`` (token mean) or ``dr_grpo`` (sum / (rows * L)).
5. ``make_grpo_step``: ``num_iterations`` passes over the rollout, each cut into
   ``steps_per_generation`` updates of ``gradient_accumulation_steps`` micro-batches.
6. ``make_train``: sample prompts -> rollout -> JAX rewards -> step, the whole run in one
   ``lax.scan`` (``jax.vmap`` over it trains several seeds at once; see ``rljax.sweep``).

Shapes: ``Bp`` prompts per step, ``G = num_generations``, ``B = Bp * G`` completions, ``P``
prompt length (left-padded), ``N`` completion length (right-padded after eos).
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

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")


# ==========================================================================
# 1. Settings and state
# ==========================================================================


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The algorithm's settings (hashable: they are compile-time constants of the step).

    ``generation_batch_size`` completions per rollout (``B``; a multiple of ``num_generations``
    and of ``steps_per_generation * gradient_accumulation_steps``); each rollout feeds
    ``num_iterations * steps_per_generation`` optimizer updates of ``B / steps_per_generation``
    completions. Field names and defaults are TRL's ``GRPOConfig`` (v0.19-v0.21)."""

    num_generations: int = 8
    """Completions sampled per prompt (the group of the group-relative advantage)."""
    generation_batch_size: int = 64
    """Completions per rollout (B): a multiple of num_generations."""
    max_completion_length: int = 256
    """Completion tokens per sample (N); dr_grpo divides by it."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs are those of softmax(logits / temperature) (must equal generate_fn's)."""
    beta: float = 0.0
    """KL coefficient (k3 estimator to the reference); 0 runs no reference forward at all."""
    epsilon: float = 0.2
    """Lower clipping range of the importance weight (and upper, unless epsilon_high)."""
    epsilon_high: Optional[float] = None
    """Upper clipping range (None: epsilon; DAPO's clip-higher uses 0.28)."""
    delta: Optional[float] = None
    """Two-sided clipping: cap on the unclipped importance weight (None: off)."""
    importance_sampling_level: str = "token"
    """Importance weights per token ('token') or one per sequence ('sequence', GSPO)."""
    scale_rewards: bool = True
    """Divide the group-centred rewards by the group's std (+1e-4)."""
    loss_type: str = "bnpo"
    """Loss aggregation: grpo (per-sequence mean), bnpo (token mean) or dr_grpo (sum / (rows * N))."""
    mask_truncated_completions: bool = False
    """Leave completions without eos out of the loss."""
    num_iterations: int = 1
    """Passes over each rollout (mu in the paper); > 1 scores the rollout's 'old' log-probs."""
    steps_per_generation: int = 1
    """Optimizer updates per rollout pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches averaged per optimizer update."""
    reward_weights: Optional[Tuple[float, ...]] = None
    """Weights of the reward functions (None: all 1)."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (the group baseline needs two samples), got {self.num_generations}."
            )
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size} must be a multiple of num_generations="
                f"{self.num_generations} (whole groups per rollout)."
            )
        per_gen = self.steps_per_generation * self.gradient_accumulation_steps
        if self.generation_batch_size % per_gen:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size} must be a multiple of steps_per_generation * "
                f"gradient_accumulation_steps = {per_gen}."
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, got {self.importance_sampling_level!r}."
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}.")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("beta must be >= 0 and epsilon / epsilon_high > 0.")
        if self.num_iterations < 1 or self.steps_per_generation < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("num_iterations, steps_per_generation and gradient_accumulation_steps must be >= 1.")
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))

    @property
    def num_prompts(self) -> int:
        """Prompts per rollout (``Bp``)."""
        return self.generation_batch_size // self.num_generations

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_old_logprobs(self) -> bool:
        """More than one update per rollout: the ratio needs the rollout policy's log-probs
        (otherwise TRL, and rljax, use the detached current ones: ratio exactly 1)."""
        return self.num_iterations * self.steps_per_generation > 1


GRPOTrainState = PolicyTrainState  # shared with the other critic-free loop (rljax.rollout)

# ==========================================================================
# 2. Rollout: groups of completions and the log-probs the loss needs
# ==========================================================================


@flax.struct.dataclass
class GRPOBatch:
    """One rollout. Rows ``g*G .. g*G+G-1`` are the ``G`` completions of prompt ``g``.
    ``old_logprobs`` is None when one update uses the rollout (``needs_old_logprobs``);
    ``ref_logprobs`` is None when ``beta == 0``."""

    prompts: Array  # [B, P] left-padded (each prompt repeated G times)
    prompt_mask: Array  # [B, P]
    completions: Array  # [B, N] right-padded
    completion_mask: Array  # [B, N] int32: 1 up to and including the first eos
    truncated: Array  # [B] bool: no eos within N tokens
    old_logprobs: Optional[Array] = None  # [B, N]
    ref_logprobs: Optional[Array] = None  # [B, N]


def is_truncated(completions: Array, completion_mask: Array, eos_token_id: Union[None, int, Sequence[int]]) -> Array:
    """[B] bool: the completion ran to the last slot without an eos (TRL's ``~is_eos.any(1)``).
    ``eos_token_id`` None: a completion that fills every slot counts as truncated."""
    full = completion_mask[:, -1] > 0
    if eos_token_id is None:
        return full
    eos = jnp.asarray([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), jnp.int32)
    return full & ~jnp.isin(completions[:, -1], eos)


def make_grpo_rollout(
    module: Any,
    generate_fn: Callable,
    settings: GRPOSettings,
    *,
    ref_module: Optional[Any] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Callable:
    """``rollout(state, prompts [Bp, P], prompt_mask [Bp, P], rng) -> GRPOBatch`` (pure; jit it).

    ``generate_fn(params, ids, mask, rng)``: e.g. ``rljax.generation.make_generate_fn(...,
    jit=False)`` (sampling settings live there). ``ref_module`` (default ``module``) scores the
    reference: on ``state.ref_params``, or on the policy's params when those are None.
    ``eos_token_id``: what ends a completion (for ``truncated``). ``chunk_size``: rows per scoring
    forward (``rljax.rollout.chunked_rows``)."""
    G, T = settings.num_generations, settings.temperature
    ref_module = module if ref_module is None else ref_module
    check_temperature(generate_fn, T, "GRPOSettings")

    def rollout(state: Any, prompts: Array, prompt_mask: Array, rng: Array) -> GRPOBatch:
        prompts, prompt_mask, completions, mask = sample_groups(generate_fn, state.params, prompts, prompt_mask, G, rng)
        old = ref = None
        if settings.needs_old_logprobs:
            old = response_logprobs(module, state.params, prompts, prompt_mask, completions, mask,
                                    chunk_size=chunk_size, temperature=T).logprobs
        if settings.beta != 0.0:  # static: beta = 0 compiles no reference forward
            ref_p = state.params if state.ref_params is None else state.ref_params
            ref = response_logprobs(ref_module, ref_p, prompts, prompt_mask, completions, mask,
                                    chunk_size=chunk_size, temperature=T).logprobs
        return GRPOBatch(
            prompts=prompts, prompt_mask=prompt_mask, completions=completions, completion_mask=mask,
            truncated=is_truncated(completions, mask, eos_token_id),
            old_logprobs=None if old is None else jax.lax.stop_gradient(old),
            ref_logprobs=None if ref is None else jax.lax.stop_gradient(ref),
        )

    return rollout


# ==========================================================================
# 3. Rewards and group-relative advantages
# ==========================================================================


def combine_rewards(rewards_per_func: Array, weights: Optional[Sequence[float]] = None) -> Array:
    """``[B, F]`` rewards of ``F`` functions -> ``[B]``: ``nansum(rewards * weights)`` (TRL: a
    function returning None/NaN for a row does not count there). ``weights`` default all 1."""
    rewards_per_func = jnp.asarray(rewards_per_func, jnp.float32)
    chex.assert_rank(rewards_per_func, 2)
    F = rewards_per_func.shape[1]
    w = jnp.ones((F,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (F,):
        raise ValueError(f"reward_weights has {w.shape[0]} entries but there are {F} reward functions; give one each.")
    return jnp.nansum(rewards_per_func * w[None, :], axis=1)


def group_advantages(rewards: Array, num_generations: int, scale_rewards: bool = True) -> Tuple[Array, Array, Array]:
    """GRPO's advantages of ``rewards`` [B] (groups of ``num_generations`` contiguous rows).

    ``A_i = r_i - mean_g`` and, with ``scale_rewards``, ``/ (std_g + 1e-4)`` (std unbiased, as
    torch). A group with equal rewards gets zero advantages. Returns ``(advantages, mean_g,
    std_g)``, each [B] (group statistics repeated over the group's rows)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    chex.assert_rank(rewards, 1)
    groups = rewards.reshape(-1, num_generations)
    mean = jnp.repeat(groups.mean(axis=1), num_generations)
    std = jnp.repeat(groups.std(axis=1, ddof=1), num_generations)
    advantages = rewards - mean
    if scale_rewards:
        advantages = advantages / (std + 1e-4)
    return advantages, mean, std


# ==========================================================================
# 4. The loss
# ==========================================================================


def grpo_loss(
    logprobs: Array,
    old_logprobs: Optional[Array],
    ref_logprobs: Optional[Array],
    advantages: Array,
    mask: Array,
    settings: GRPOSettings,
    entropy: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Array]]:
    """TRL's GRPO loss of one micro-batch. ``logprobs`` [b, N] (differentiated), ``old_logprobs``
    [b, N] (None: ``stop_gradient(logprobs)``), ``ref_logprobs`` [b, N] (used iff ``beta != 0``),
    ``advantages`` [b], ``mask`` [b, N] (completion mask, truncated rows zeroed if asked),
    ``entropy`` [b, N] or None. Returns ``(loss, metrics)``: ``kl``, ``entropy``,
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked means)."""
    s = settings
    mask = mask.astype(jnp.float32)
    old = jax.lax.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
    log_ratio = logprobs - old
    if s.importance_sampling_level == "sequence":  # GSPO: one weight per sequence, [b, 1]
        log_w = ((log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    else:
        log_w = log_ratio
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1.0 - s.epsilon_low, 1.0 + s.epsilon_upper)
    if s.delta is not None:  # two-sided clipping of the unclipped branch
        coef_1 = jnp.minimum(coef_1, s.delta)
    adv = advantages[:, None]
    per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    if s.beta != 0.0:
        d = ref_logprobs - logprobs
        per_token_kl = jnp.exp(d) - d - 1.0  # k3 estimator of KL(policy || ref)
        per_token_loss = per_token_loss + s.beta * per_token_kl

    if s.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()
    elif s.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    else:  # dr_grpo
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * s.max_completion_length)

    count = jnp.maximum(mask.sum(), 1.0)

    def batch_mean(x):
        x = x.astype(jnp.float32)
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / count

    low = (coef_1 < 1.0 - s.epsilon_low) & (adv < 0)
    high = (coef_1 > 1.0 + s.epsilon_upper) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": batch_mean(low),
        "clip_ratio/high_mean": batch_mean(high),
        "clip_ratio/region_mean": batch_mean(low | high),
        "kl": batch_mean(per_token_kl) if s.beta != 0.0 else jnp.zeros((), jnp.float32),
        "entropy": batch_mean(entropy) if entropy is not None else jnp.zeros((), jnp.float32),
    }
    return loss, metrics


# ==========================================================================
# 5. The step
# ==========================================================================


def make_grpo_step(
    module: Any,
    settings: GRPOSettings,
    tx: optax.GradientTransformation,
    *,
    mesh: Optional[Any] = None,
) -> Callable:
    """``grpo_step(state, batch: GRPOBatch, rewards_per_func [B, F]) -> (state, stats)`` (pure).

    Advantages from the weighted rewards, then ``num_iterations`` passes over one shuffle of the
    rollout (TRL shuffles the generation batch once and reuses its split), each pass
    ``steps_per_generation`` optimizer updates (``tx``, closed over) of averaged gradients of
    ``gradient_accumulation_steps`` micro-batches. ``stats`` (scalars, TRL's keys): ``reward``,
    ``reward_std``, ``frac_reward_zero_std``, ``rewards/mean_per_func`` [F],
    ``completions/mean_length``, ``completions/clipped_ratio``, ``kl``, ``entropy``,
    ``clip_ratio/*``, ``loss``, ``grad_norm``."""
    s = settings
    B, S, GA = s.generation_batch_size, s.steps_per_generation, s.gradient_accumulation_steps
    mb = B // (S * GA)

    def loss_fn(params, micro):
        scores = response_logprobs(module, params, micro["prompts"], micro["prompt_mask"], micro["completions"],
                                   micro["completion_mask"], return_entropy=True, temperature=s.temperature)
        return grpo_loss(scores.logprobs, micro.get("old_logprobs"), micro.get("ref_logprobs"), micro["advantages"],
                         micro["loss_mask"], s, entropy=scores.entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(carry, micros):
        params, opt_state = carry

        def accumulate(grads_acc, micro):
            micro = constrain_batch(micro, mesh)
            (loss, metrics), grads = grad_fn(params, micro)
            return jax.tree_util.tree_map(jnp.add, grads_acc, grads), dict(metrics, loss=loss)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(accumulate, zeros, micros)
        grads = jax.tree_util.tree_map(lambda g: g / GA, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = jnp.broadcast_to(optax.global_norm(grads), (GA,))
        return (params, opt_state), metrics

    def grpo_step(state: GRPOTrainState, batch: GRPOBatch, rewards_per_func: Array):
        rewards_per_func = jnp.asarray(rewards_per_func, jnp.float32)
        if rewards_per_func.ndim == 1:
            rewards_per_func = rewards_per_func[:, None]
        chex.assert_shape(rewards_per_func, (B, None))
        chex.assert_shape(batch.completions, (B, None))
        rewards = combine_rewards(rewards_per_func, s.reward_weights)
        advantages, mean_g, std_g = group_advantages(rewards, s.num_generations, s.scale_rewards)
        mask = batch.completion_mask
        loss_mask = mask * (~batch.truncated)[:, None] if s.mask_truncated_completions else mask
        data = dict(prompts=batch.prompts, prompt_mask=batch.prompt_mask, completions=batch.completions,
                    completion_mask=mask, loss_mask=loss_mask, advantages=advantages)
        if batch.old_logprobs is not None:
            data["old_logprobs"] = batch.old_logprobs
        if s.beta != 0.0:
            if batch.ref_logprobs is None:
                raise ValueError("beta != 0 needs batch.ref_logprobs: build the rollout with the same settings.")
            data["ref_logprobs"] = batch.ref_logprobs
        rng, perm_key = jax.random.split(state.rng)
        perm = jax.random.permutation(perm_key, B)
        split = jax.tree_util.tree_map(lambda x: x[perm].reshape(S, GA, mb, *x.shape[1:]), data)
        split = constrain_batch(split, mesh, batch_axis=2)

        def iteration(carry, _):
            return jax.lax.scan(update, carry, split)

        (params, opt_state), metrics = jax.lax.scan(
            iteration, (state.params, state.opt_state), None, length=s.num_iterations
        )
        lengths = mask.sum(-1).astype(jnp.float32)
        stats = {k: v.mean() for k, v in metrics.items()}  # over iterations x updates x micro-batches
        stats.update({
            "reward": mean_g.mean(),
            "reward_std": std_g.mean(),
            "frac_reward_zero_std": jnp.isclose(std_g, 0.0).astype(jnp.float32).mean(),
            "rewards/mean_per_func": jnp.nanmean(rewards_per_func, axis=0),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": batch.truncated.astype(jnp.float32).mean(),
        })
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, stats

    return grpo_step


# ==========================================================================
# 6. The whole loop as one compiled function
# ==========================================================================


def sample_prompt_indices(key: Array, step: Array, num_prompts: int, batch: int) -> Array:
    """Indices of ``batch`` prompts for iteration ``step``: epochs over the bank without
    replacement (one permutation per epoch from ``fold_in(key, epoch)``; the last
    ``num_prompts % batch`` of each permutation are left out, ``drop_last``)."""
    per_epoch = num_prompts // batch
    order = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), num_prompts)
    return jax.lax.dynamic_slice_in_dim(order, (step % per_epoch) * batch, batch)


def make_train(
    module: Any,
    settings: GRPOSettings,
    generate_fn: Callable,
    reward_fns: Union[Callable, Sequence[Callable]],
    num_steps: int,
    tx: optax.GradientTransformation,
    *,
    ref_module: Optional[Any] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Callable:
    """``train(state, reward_params, prompts, prompt_mask) -> (state, stats)``: ``num_steps`` GRPO
    iterations in one ``lax.scan``.

    Large things are arguments: ``reward_params`` (any pytree, passed to every reward function;
    None for parameter-free rewards) and the left-padded prompt bank ``prompts``/``prompt_mask``
    [num_prompts, P]. ``reward_fns``: JAX functions ``(reward_params, GRPOBatch) -> [B]``,
    weighted by ``settings.reward_weights``. Each iteration draws ``settings.num_prompts`` prompts
    (epochs without replacement, see ``sample_prompt_indices``), rolls out, scores and runs
    ``grpo_step``. ``stats``: every scalar of ``grpo_step``, each ``[num_steps]``
    (``rewards/mean_per_func``: ``[num_steps, F]``). ``jax.jit(train)``;
    ``jax.vmap(train, in_axes=(0, None, None, None))`` trains several seeds at once."""
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    if not fns:
        raise ValueError("reward_fns is empty: give at least one reward function.")
    if settings.reward_weights is not None and len(settings.reward_weights) != len(fns):
        raise ValueError(
            f"reward_weights has {len(settings.reward_weights)} entries for {len(fns)} reward functions; give one each."
        )
    Bp, B = settings.num_prompts, settings.generation_batch_size
    rollout_fn = make_grpo_rollout(module, generate_fn, settings, ref_module=ref_module, eos_token_id=eos_token_id,
                                   chunk_size=chunk_size)
    grpo_step = make_grpo_step(module, settings, tx)

    def train(state: GRPOTrainState, reward_params: Any, prompts: Array, prompt_mask: Array):
        chex.assert_rank([prompts, prompt_mask], 2)
        chex.assert_equal_shape([prompts, prompt_mask])
        n = prompts.shape[0]
        if n < Bp:
            raise ValueError(f"The prompt bank has {n} prompts, fewer than generation_batch_size / num_generations = {Bp}.")
        rng, bank_key = jax.random.split(state.rng)
        state = state.replace(rng=rng)

        def _update_step(state, i):
            idx = sample_prompt_indices(bank_key, i, n, Bp)
            rng, k_gen = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            batch = rollout_fn(state, prompts[idx], prompt_mask[idx], k_gen)
            scores = []
            for fn in fns:
                r = fn(reward_params, batch)
                if jnp.shape(r) != (B,):
                    raise ValueError(f"a reward function must return shape ({B},); it returned {jnp.shape(r)}.")
                scores.append(jnp.asarray(r, jnp.float32))
            return grpo_step(state, batch, jnp.stack(scores, axis=1))

        return jax.lax.scan(_update_step, state, jnp.arange(num_steps))

    return train


make_grpo_train = make_train  # the name rljax exports at top level (rljax.make_grpo_train)

__all__ = [
    "GRPOBatch",
    "GRPOSettings",
    "GRPOTrainState",
    "combine_rewards",
    "group_advantages",
    "grpo_loss",
    "is_truncated",
    "make_grpo_rollout",
    "make_grpo_step",
    "make_train",
    "make_grpo_train",
    "sample_prompt_indices",
]
