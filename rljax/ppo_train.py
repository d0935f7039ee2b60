"""PPO training as pure, jitted functions over a ``PPOTrainState``.

Read top to bottom, like the algorithm:

1. ``PPOTrainState``: policy params (LM + value head), frozen reference params,
   optimizer state, PRNG key, KL-controller state, running score moments.
2. ``make_forward_rollout``: one forward pass of policy and reference over
   ``[query | response]`` gives TRL's ``logprobs``, ``ref_logprobs``, ``values``
   and ``masks`` (TRL's ``batched_forward_pass``), as a ``Rollout`` pytree.
   ``make_rollout`` puts generation in front of it (one jitted function).
3. ``make_ppo_step``: TRL's ``PPOTrainer.step`` after the forward pass: score
   processing, ``compute_rewards``, ``compute_advantages``, ``ppo_epochs`` x
   shuffled minibatches (gradient accumulation, clipping) as nested
   ``lax.scan``, early stopping, stats with TRL's keys, the KL-controller update.
4. ``make_train``: when the reward is a JAX function, the whole loop
   (sample prompts -> rollout -> reward -> ppo_step) is one ``lax.scan``.

Sequence layout: ``input_ids = [left-padded query (P) | response (N)]``; the
response is right-padded after eos. Position ``t`` of the ``[B, P+N-1]`` arrays
is about predicting token ``t+1`` (TRL's shift), so ``masks[:, t] = 1`` iff token
``t+1`` is a real response token. Only masked-out positions differ from TRL's
right-padded layout, and every TRL quantity on masked positions is unchanged
(``whiten_rewards`` is the one place the pad count leaks into the numbers; see
``advantages_in_trl_layout``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax.core import (
    RunningMomentsState,
    logprobs_from_logits,
    running_moments_init,
)
from rljax.losses import ppo_loss
from rljax.ppo import (
    KLControllerState,
    PPOConfig,
    compute_advantages,
    compute_rewards,
    kl_controller_init,
    kl_controller_update,
    process_scores,
    step_stats,
)
from rljax.rollout import (  # noqa: F401  (re-exported: the old import paths keep working)
    ResponseScores,
    Rollout,
    make_forward_rollout,
    make_rollout,
    response_logprobs,
    sequence_inputs,
)
from rljax.sharding import constrain_batch

Array = jax.Array
# Padding value of TRL's stack_dicts for stats of minibatches that did not run.
STATS_PADDING = -1.0


# ==========================================================================
# 1. State
# ==========================================================================


@flax.struct.dataclass
class PPOTrainState:
    """Everything one PPO iteration reads and writes.

    ``ref_params`` is None when the reference is computed another way (e.g. the
    policy with adapters off); ``tx`` is static.
    """

    step: Array
    params: Any
    ref_params: Any
    opt_state: Any
    rng: Array
    kl: KLControllerState
    score_moments: RunningMomentsState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        params: Any,
        ref_params: Any,
        config: PPOConfig,
        tx: Optional[optax.GradientTransformation] = None,
        rng: Optional[Array] = None,
    ) -> "PPOTrainState":
        tx = tx if tx is not None else make_ppo_optimizer(config)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ref_params=ref_params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed) if rng is None else rng,
            kl=kl_controller_init(config),
            score_moments=running_moments_init(),
            tx=tx,
        )


def make_ppo_optimizer(config: PPOConfig, trainable: Optional[Any] = None) -> optax.GradientTransformation:
    """TRL's default: Adam(lr=learning_rate) (torch defaults), grad-norm clipping at
    ``max_grad_norm`` when set. ``trainable``: optional bool pytree (False = frozen).

    The learning rate is an ``optax.inject_hyperparams`` hyperparameter, so it lives in the
    optimizer state: ``ppo/learning_rate`` reads it there and a shell can change it between
    steps (``set_learning_rate``) without recompiling."""
    tx = _adam_with_clipping(float(config.learning_rate), config.max_grad_norm)
    if trainable is not None:
        leaves, treedef = jax.tree_util.tree_flatten(trainable)
        tx = _with_frozen(tx, treedef, tuple(bool(t) for t in leaves))
    return tx


@functools.lru_cache(maxsize=32)
def _with_frozen(tx: optax.GradientTransformation, treedef: Any, trainable: Tuple[bool, ...]):
    """``tx`` on the trainable leaves, zero updates (and no state) on the others; cached so
    equal settings give an equal transformation (see ``_adam_with_clipping``)."""
    labels = jax.tree_util.tree_unflatten(treedef, ["train" if t else "frozen" for t in trainable])
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


@functools.lru_cache(maxsize=32)
def _adam_with_clipping(learning_rate: float, max_grad_norm: Optional[float]) -> optax.GradientTransformation:
    """One optax object per setting: the optimizer is a static field of the state, so equal
    configs must give an EQUAL transformation or every new state recompiles ppo_step."""

    def adam(learning_rate):
        parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
        parts.append(optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8))
        return optax.chain(*parts)

    return optax.inject_hyperparams(adam)(learning_rate=learning_rate)


def freeze_params(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """``tx`` whose updates are zero wherever ``trainable`` (bool pytree like the params) is
    False, whatever ``tx`` is (weight decay included): those params never move."""
    frozen = jax.tree_util.tree_map(lambda t: not t, trainable)
    return optax.chain(tx, optax.masked(optax.set_to_zero(), frozen))


def _is_injected(x: Any) -> bool:
    return isinstance(getattr(x, "hyperparams", None), dict) and "learning_rate" in x.hyperparams


def learning_rate_of(opt_state: Any) -> Array:
    """The ``learning_rate`` of the first ``optax.inject_hyperparams`` state in ``opt_state``
    (the rate of the last update), float32 scalar; NaN when the optimizer does not expose one
    (e.g. a plain ``optax.adam(1e-3)``: its rate is hidden in a closure). Jittable."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected) if _is_injected(x)]
    if not found:
        return jnp.asarray(jnp.nan, jnp.float32)
    return jnp.asarray(found[0].hyperparams["learning_rate"], jnp.float32)


def has_learning_rate(opt_state: Any) -> bool:
    """Whether ``opt_state`` has an injected ``learning_rate`` (see ``learning_rate_of``)."""
    return any(_is_injected(x) for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected))


def set_learning_rate(opt_state: Any, learning_rate: Any) -> Any:
    """``opt_state`` with every injected ``learning_rate`` set to ``learning_rate`` (same dtype)."""

    def put(x):
        if not _is_injected(x):
            return x
        old = x.hyperparams["learning_rate"]
        new = jnp.asarray(learning_rate, jnp.asarray(old).dtype)
        if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
            new = jax.device_put(new, old.sharding)  # keep a sharded state's placement
        return x._replace(hyperparams={**x.hyperparams, "learning_rate": new})

    return jax.tree_util.tree_map(put, opt_state, is_leaf=_is_injected)


# ==========================================================================
# 2. Rollout
# ==========================================================================


def _roll_rows(x: Array, shift: Array) -> Array:
    """Roll row ``b`` of ``x`` [B, W] right by ``shift[b]`` (negative: left), wrapping around."""
    W = x.shape[1]
    idx = (jnp.arange(W)[None, :] - shift[:, None]) % W
    return jnp.take_along_axis(x, idx, axis=1)


def advantages_in_trl_layout(
    rollout: Rollout, rewards: Array, masks: Array, gamma: float, lam: float, whiten_rewards: bool = False
) -> Tuple[Array, Array, Array]:
    """``compute_advantages`` with TRL's padding where the layout shows through.

    With ``whiten_rewards`` TRL whitens the masked rewards at EVERY position, so each
    trailing pad position after a response carries ``mean * (1 - rsqrt(var))`` and the GAE
    recursion carries it back into that response's advantages and returns. TRL's trailing
    pad count is its right-padded ``[query | response]`` length, ``max_b(len q_b + len r_b)``,
    minus the row's own length; ours would be ``N - len r``. Each row is rolled so that it
    has TRL's count (only masked positions wrap), GAE runs, and the results roll back.
    Without ``whiten_rewards`` masked rewards and values are zero and the layout cannot
    matter, so no roll is done. All outputs [B, T] in rljax's layout.
    """
    if not whiten_rewards:
        return compute_advantages(rollout.values, rewards, masks, gamma, lam, whiten_rewards=False)
    qlen = rollout.query_mask.sum(-1).astype(jnp.int32)
    rlen = rollout.response_mask.sum(-1).astype(jnp.int32)
    shift = rollout.responses.shape[1] + qlen - jnp.max(qlen + rlen)
    roll = lambda x: _roll_rows(x, shift)  # noqa: E731
    values, advantages, returns = compute_advantages(
        roll(rollout.values), roll(rewards), roll(masks), gamma, lam, whiten_rewards=True
    )
    return tuple(_roll_rows(x, -shift) for x in (values, advantages, returns))


# ==========================================================================
# 3. The PPO step
# ==========================================================================


def make_ppo_step(module: Any, config: PPOConfig, *, num_processes: int = 1, mesh: Optional[Any] = None) -> Callable:
    """Build ``ppo_step(state, rollout, scores [B]) -> (state, stats)`` (pure; jit it).

    TRL 0.7.11's optimisation phase: ``ppo_epochs`` epochs, each a fresh permutation cut
    into backward batches of ``mini_batch_size * gradient_accumulation_steps``; gradients of
    the ``gradient_accumulation_steps`` minibatches are averaged (accelerate's scaling) and
    clipped, then one optimizer update. Every forward pass runs without dropout: TRL
    0.7.11's ``batched_forward_pass`` calls ``model.eval()`` before the training forward
    too (``model.train()`` comes only after it, in ``train_minibatch``), so TRL's PPO never
    applies dropout and the first minibatch's ratio is exactly 1.
    Deliberate fixes: a backward batch whose minibatches were all skipped by
    ``ratio_threshold`` leaves params and optimizer untouched (TRL still calls optimizer.step(), and Adam's moments move the params); non-finite
    scores leave the whole state untouched (``ppo/skipped_nonfinite_scores`` = 1).

    Data parallel: every minibatch keeps its rows split over the mesh's ("data", "fsdp")
    axes (``rljax.sharding.constrain_batch``), so on a ``data=4`` mesh each device does a
    quarter of the work. ``mesh``: the mesh the step runs on; default the ambient mesh that
    ``rljax.sharding.jit_sharded`` sets (none: no constraints, as on one device).
    """
    B, mb, GA = config.batch_size, config.mini_batch_size, config.gradient_accumulation_steps
    bb = mb * GA
    if B % bb:
        raise ValueError(f"batch_size {B} must be a multiple of mini_batch_size*gradient_accumulation_steps = {bb}.")
    n_bb, epochs = B // bb, config.ppo_epochs

    def loss_fn(params, batch):
        out = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
            deterministic=True,
        )
        logits = out.logits[:, :-1]
        logprobs = logprobs_from_logits(logits, batch["input_ids"][:, 1:])
        vpreds = out.values[:, :-1].astype(jnp.float32)
        pg_loss, vf_loss, stats = ppo_loss(
            batch["logprobs"], batch["values"], logits, vpreds, logprobs, batch["masks"], batch["advantages"],
            batch["returns"], cliprange=config.cliprange, cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef, ratio_threshold=config.ratio_threshold,
        )
        return pg_loss + vf_loss, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def make_epoch(tx, data):
        """One PPO epoch over ``data`` (the [B, ...] arrays), as a ``lax.scan`` body."""

        def backward_batch(carry, inputs):
            """GA minibatches -> averaged grads -> one update (unless all skipped)."""
            params, opt_state = carry
            batches = inputs  # leaves [GA, mb, ...]

            def minibatch(grads_acc, batch):
                batch = constrain_batch(batch, mesh)  # [mb, ...]: rows stay split over (data, fsdp)
                (_, stats), grads = grad_fn(params, batch)
                keep = 1.0 - stats["skipped"]
                grads = jax.tree_util.tree_map(lambda g: jnp.where(keep > 0, g, 0.0), grads)
                return jax.tree_util.tree_map(jnp.add, grads_acc, grads), stats

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            grads, stats = jax.lax.scan(minibatch, zeros, batches)
            grads = jax.tree_util.tree_map(lambda g: g / GA, grads)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            all_skipped = jnp.all(stats["skipped"] > 0)
            pick = lambda new, old: jnp.where(all_skipped, old, new)  # noqa: E731
            params = jax.tree_util.tree_map(pick, new_params, params)
            opt_state = jax.tree_util.tree_map(pick, new_opt_state, opt_state)
            return (params, opt_state), stats

        def epoch(carry, key):
            params, opt_state, stopped = carry
            perm_key, _ = jax.random.split(key)
            perm = jax.random.permutation(perm_key, B)

            def run(_):
                # Permute once per epoch and cut into [n_bb, GA, mb, ...] (TRL's minibatches, in
                # TRL's order); the mb axis is constrained to the batch axes, so each device
                # keeps 1/(data*fsdp) of every minibatch instead of the gather replicating it.
                shuffled = jax.tree_util.tree_map(lambda x: x[perm].reshape(n_bb, GA, mb, *x.shape[1:]), data)
                shuffled = constrain_batch(shuffled, mesh, batch_axis=2)
                (p, o), stats = jax.lax.scan(backward_batch, (params, opt_state), shuffled)
                return p, o, stats

            def skip(_):
                shapes = jax.eval_shape(run, None)[2]
                stats = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, STATS_PADDING, s.dtype), shapes)
                return params, opt_state, stats

            new_params, new_opt_state, stats = jax.lax.cond(stopped, skip, run, None)
            ran = jnp.logical_not(stopped)
            if config.early_stopping:  # TRL: the LAST minibatch's policykl, checked after each epoch
                stopped = stopped | (stats["policy/policykl"][-1, -1] > 1.5 * config.target_kl)
            return (new_params, new_opt_state, stopped), (stats, ran)

        return epoch

    def ppo_step(state: PPOTrainState, rollout: Rollout, scores: Array) -> Tuple[PPOTrainState, Dict[str, Array]]:
        scores = jnp.asarray(scores, jnp.float32)
        chex.assert_shape(scores, (B,))
        chex.assert_shape(rollout.queries, (B, None))
        finite = jnp.all(jnp.isfinite(scores))
        safe_scores = jnp.where(finite, scores, 0.0)
        scores_p, moments = process_scores(
            safe_scores, state.score_moments, use_score_scaling=config.use_score_scaling,
            use_score_norm=config.use_score_norm, score_clip=config.score_clip,
        )
        kl_coef = state.kl.value
        masks = rollout.masks
        if config.kl_penalty == "full":
            rewards, non_score, kls = compute_rewards(
                scores_p, rollout.kls, jnp.zeros_like(rollout.kls), masks, kl_coef, "kl"
            )
        else:
            rewards, non_score, kls = compute_rewards(
                scores_p, rollout.logprobs, rollout.ref_logprobs, masks, kl_coef, config.kl_penalty
            )
        values, advantages, returns = advantages_in_trl_layout(
            rollout, rewards, masks, config.gamma, config.lam, whiten_rewards=config.whiten_rewards
        )
        input_ids, attention_mask, position_ids, _ = sequence_inputs(
            rollout.queries, rollout.query_mask, rollout.responses, rollout.response_mask
        )
        data = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            logprobs=rollout.logprobs, values=values, masks=masks, advantages=advantages, returns=returns,
        )
        rng, step_key = jax.random.split(state.rng)
        carry = (state.params, state.opt_state, jnp.array(False))
        epoch = make_epoch(state.tx, data)
        (params, opt_state, _), (mb_stats, ran) = jax.lax.scan(epoch, carry, jax.random.split(step_key, epochs))
        # mb_stats leaves: [epochs, n_bb, GA, ...]; average the minibatches that ran (TRL: stack + mean).
        weight = jnp.broadcast_to(ran[:, None, None], (epochs, n_bb, GA)).astype(jnp.float32)
        train_stats = {}
        for key, v in mb_stats.items():
            if key in ("policy/advantages", "policy/ratio"):
                # TRL: flattened, not averaged. Static shape [epochs * B * T]: epochs skipped by
                # early stopping are a STATS_PADDING tail; drop_skipped_epochs cuts it host-side.
                train_stats[key] = jnp.nan_to_num(v, nan=STATS_PADDING).reshape(-1)
            elif key != "skipped":
                train_stats[key] = jnp.sum(v * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        skipped = jnp.sum(mb_stats["skipped"] * weight)
        stats = step_stats(
            scores=scores_p, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, non_score_reward=non_score,
            kls=kls, masks=masks, kl_coef=kl_coef, queries_len=rollout.query_mask.sum(-1),
            responses_len=rollout.response_mask.sum(-1), train_stats=train_stats,
        )
        stats["ppo/learning_rate"] = learning_rate_of(opt_state)  # the rate the last update used
        stats["ppo/epochs_run"] = jnp.sum(ran.astype(jnp.float32))
        stats["ppo/minibatches_skipped"] = skipped
        stats["ppo/skipped_nonfinite_scores"] = 1.0 - finite.astype(jnp.float32)
        new_kl = kl_controller_update(state.kl, stats["objective/kl"], B * num_processes)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng, kl=new_kl, score_moments=moments
        )
        # Non-finite scores: nothing learned from this batch, nothing corrupted.
        keep_old = jnp.logical_not(finite)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(keep_old, old, new), new_state, state.replace(step=state.step + 1, rng=rng)
        )
        return new_state, stats

    return ppo_step


PER_TOKEN_TRAIN_KEYS = ("ppo/policy/advantages", "ppo/policy/ratio")


def drop_skipped_epochs(stats: Dict[str, Any], ppo_epochs: int) -> Dict[str, Any]:
    """Host-side: cut the per-token train stats (``PER_TOKEN_TRAIN_KEYS``, flat
    ``[ppo_epochs * B * T]``) to the ``ppo/epochs_run`` epochs that ran, as TRL leaves the
    epochs skipped by early stopping out of its stats. ``stats``: numpy values of ``ppo_step``."""
    ran = int(round(float(stats["ppo/epochs_run"])))
    out = dict(stats)
    for key in PER_TOKEN_TRAIN_KEYS:
        if key in out:
            v = np.asarray(out[key]).reshape(-1)
            out[key] = v[: ran * (v.size // ppo_epochs)]
    return out


# ==========================================================================
# 4. The whole loop as one compiled function
# ==========================================================================


SCALAR_STAT_KEYS = (
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_scores", "ppo/std_scores",
    "ppo/mean_non_score_reward", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy",
    "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/returns/mean", "ppo/val/var_explained",
    "tokens/responses_len_mean", "ppo/minibatches_skipped", "ppo/skipped_nonfinite_scores",
)


def make_train(
    module: Any,
    config: PPOConfig,
    generate_fn: Callable,
    reward_fn: Callable[[Rollout], Array],
    prompts: Array,
    prompt_mask: Array,
    num_steps: int,
) -> Callable:
    """``train(state) -> (state, stats)``: ``num_steps`` PPO iterations in one ``lax.scan``.

    Each iteration samples ``batch_size`` prompts (without replacement) from the bank
    ``prompts`` [num_prompts, P], rolls out, scores with the JAX ``reward_fn(rollout) -> [B]``
    (raw scores, logged as ``env/reward_mean``) and runs ``ppo_step``. ``stats`` holds the
    scalar stats in ``SCALAR_STAT_KEYS`` plus ``env/reward_mean``, each ``[num_steps]``
    (``ppo/skipped_nonfinite_scores`` counts the iterations whose rewards were not finite and
    were therefore skipped). The prompt bank must be left-padded and ``reward_fn`` must
    return ``[batch_size]``; both are checked up front with a ``ValueError``.
    jit it (``jax.jit(train)``); ``jax.vmap`` over states trains several seeds at once.
    """
    chex.assert_rank([prompts, prompt_mask], 2)
    if not isinstance(prompt_mask, jax.core.Tracer):  # a concrete bank: check its padding up front
        from rljax.generation import _check_left_padded

        try:
            _check_left_padded(prompt_mask)
        except ValueError as e:
            raise ValueError(f"make_train: prompt_mask: {e}") from None
    prompts, prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)  # numpy banks cannot take traced indices
    n = prompts.shape[0]
    if n < config.batch_size:
        raise ValueError(f"The prompt bank has {n} prompts, fewer than batch_size={config.batch_size}.")
    rollout_fn = make_rollout(module, generate_fn, config.kl_penalty)
    ppo_step = make_ppo_step(module, config)

    def _update_step(state: PPOTrainState, _):
        rng, k_idx, k_gen = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)
        idx = jax.random.choice(k_idx, n, (config.batch_size,), replace=False)
        rollout = rollout_fn(state, prompts[idx], prompt_mask[idx], k_gen)
        scores = reward_fn(rollout)
        if jnp.shape(scores) != (config.batch_size,):
            raise ValueError(
                f"reward_fn must return one score per rollout row, shape ({config.batch_size},); it returned shape "
                f"{jnp.shape(scores)}. Reduce per-token rewards to a sequence score (e.g. .sum(-1))."
            )
        state, stats = ppo_step(state, rollout, scores)
        out = {k: stats[k] for k in SCALAR_STAT_KEYS}
        out["env/reward_mean"] = jnp.mean(scores)
        return state, out

    def train(state: PPOTrainState):
        return jax.lax.scan(_update_step, state, None, length=num_steps)

    return train
