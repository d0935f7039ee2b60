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
response is right-padded after eos. Left-padded queries put every response at the same
columns, so the LM and value heads run on the response window only (``rljax.rollout``) and
every per-token array is ``[B, N]``, aligned with the responses (TRL's ``[B, P+N-1]``
arrays hold the same numbers at their masked positions; its query columns are never read).
``whiten_rewards`` is the one place TRL's pad count leaks into the numbers; it is
reproduced analytically (see ``advantages_in_trl_layout``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax.core import (
    RunningMomentsState,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    running_moments_init,
)
from rljax.losses import ppo_loss
from rljax.models.attention import apply_windowed
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
    response_window,
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
    """Everything one PPO iteration reads and writes (all leaves: no static optimizer; the
    optax transformation belongs to the step, ``make_ppo_step(..., tx=...)``).

    ``ref_params`` is None when the reference is the policy's params under another module
    (PEFT: the policy with adapters off; see ``rljax.rollout.make_forward_rollout``).
    """

    step: Array
    params: Any
    ref_params: Any
    opt_state: Any
    rng: Array
    kl: KLControllerState
    score_moments: RunningMomentsState

    @classmethod
    def create(
        cls,
        params: Any,
        ref_params: Any,
        config: PPOConfig,
        tx: Optional[optax.GradientTransformation] = None,
        rng: Optional[Array] = None,
    ) -> "PPOTrainState":
        """A fresh state; ``tx`` (default: the config's optimizer) only initialises
        ``opt_state``: build the step with the same ``tx``."""
        tx = tx if tx is not None else make_ppo_optimizer(config)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ref_params=ref_params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed) if rng is None else rng,
            kl=kl_controller_init(config),
            score_moments=running_moments_init(),
        )


def make_ppo_optimizer(config: PPOConfig, trainable: Optional[Any] = None) -> optax.GradientTransformation:
    """TRL's default: Adam(lr=learning_rate) (torch defaults), grad-norm clipping at
    ``max_grad_norm`` when set. ``trainable``: optional bool pytree (False = frozen).

    The learning rate is an ``optax.inject_hyperparams`` hyperparameter, so it lives in the
    optimizer state: ``ppo/learning_rate`` reads it there and a shell can change it between
    steps (``set_learning_rate``) without recompiling. The transformation is closed over by
    the step (``make_ppo_step(..., tx=...)``); the state holds only its ``opt_state``."""
    tx = _adam_with_clipping(float(config.learning_rate), config.max_grad_norm)
    if trainable is not None:
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def _adam_with_clipping(learning_rate: float, max_grad_norm: Optional[float]) -> optax.GradientTransformation:
    """torch's Adam (eps 1e-8) after optional global-norm clipping, the rate injected."""

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


def _geometric_sum(ratio: Array, count: Array) -> Array:
    """``sum_{k < count} ratio**k`` (``count`` when ratio == 1)."""
    ratio = jnp.asarray(ratio, jnp.float32)
    safe = jnp.where(ratio == 1.0, 0.5, ratio)
    closed = (1.0 - jnp.power(safe, count)) / (1.0 - safe)
    return jnp.where(ratio == 1.0, count.astype(jnp.float32), closed)


def advantages_in_trl_layout(
    rollout: Rollout, rewards: Array, masks: Array, gamma: float, lam: float, whiten_rewards: bool = False
) -> Tuple[Array, Array, Array]:
    """``compute_advantages`` on the [B, N] response window, with TRL's padding where the
    layout shows through.

    With ``whiten_rewards`` TRL whitens the masked rewards at EVERY position, so each
    trailing pad position after a response carries ``c = mean * (1 - rsqrt(var + eps))``
    (a zero reward whitened with ``shift_mean=False``) and the GAE recursion carries it back
    into that response's advantages and returns. TRL's trailing pad count is ``m = max_b(len
    q_b + len r_b) - len q - len r`` (its right-padded ``[query | response]`` batch); the
    window has ``N - len r``. The difference enters analytically: the pads after the
    response add ``gamma*lam * c * S(m)`` to the last response token's GAE delta (``S(m) =
    sum_{k<m} (gamma*lam)**k``), minus what the window's own pads already add. Without
    ``whiten_rewards`` masked rewards and values are zero and the layout cannot matter.
    All outputs [B, N].
    """
    if not whiten_rewards:
        return compute_advantages(rollout.values, rewards, masks, gamma, lam, whiten_rewards=False)
    fmask = masks.astype(jnp.float32)
    values = rollout.values.astype(jnp.float32) * fmask
    masked_rewards = rewards.astype(jnp.float32) * fmask
    whitened = masked_whiten(masked_rewards, fmask, shift_mean=False)  # c at every masked position
    c = masked_mean(masked_rewards, fmask) * (1.0 - jax.lax.rsqrt(masked_var(masked_rewards, fmask) + 1e-8))
    qlen = rollout.query_mask.sum(-1).astype(jnp.int32)
    rlen = rollout.response_mask.sum(-1).astype(jnp.int32)
    N = rollout.responses.shape[1]
    trl_pads = jnp.max(qlen + rlen) - qlen - rlen  # [B]
    own_pads = N - rlen  # the window's pads after the response: already in the recursion
    gl = jnp.asarray(gamma * lam, jnp.float32)
    tail = gl * c * (_geometric_sum(gl, trl_pads) - _geometric_sum(gl, own_pads))  # [B]
    last = jax.nn.one_hot(rlen - 1, N, dtype=jnp.float32)  # the last response token (none when rlen == 0)
    # GAE over every window position (masked rewards are c, as TRL's), then TRL's whitening of the
    # advantages over the real mask; compute_advantages' returns are raw advantages + values.
    _, _, returns = compute_advantages(
        values, whitened + tail[:, None] * last, jnp.ones_like(fmask), gamma, lam, whiten_rewards=False
    )
    advantages = jax.lax.stop_gradient(masked_whiten(returns - values, fmask))
    return values, advantages, returns


# ==========================================================================
# 3. The PPO step
# ==========================================================================


def make_ppo_step(
    module: Any,
    config: PPOConfig,
    *,
    tx: Optional[optax.GradientTransformation] = None,
    num_processes: int = 1,
    mesh: Optional[Any] = None,
    trainable: Optional[Any] = None,
) -> Callable:
    """Build ``ppo_step(state, rollout, scores [B]) -> (state, stats)`` (pure; jit it).

    ``tx``: the optax transformation the step applies (closed over: the optimizer belongs to
    the step, the state holds only its ``opt_state``); default ``make_ppo_optimizer(config,
    trainable)``. ``trainable``: optional bool pytree like the params (PEFT:
    ``rljax.models.peft.trainable_mask``): gradients are taken w.r.t. the True leaves only and
    the others are passed through unchanged, so a frozen base (float or quantized, whose int8
    codes have no gradient) gets no gradient buffer and never moves; pair it with a frozen-aware
    ``tx`` (``make_ppo_optimizer(config, trainable)``).
    The state must have been created with an equal ``tx`` (``PPOTrainState.create(...,
    tx=tx)``). Two steps built from equal settings compile separately only if jitted
    separately: keep one jitted step per (module, config, tx) and reuse it.

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
    tx = make_ppo_optimizer(config, trainable) if tx is None else tx
    from rljax.models.peft import merge_trainable, split_trainable

    def split(params):  # (trainable leaves, frozen leaves); everything trains without a mask
        return (params, None) if trainable is None else split_trainable(params, trainable)

    def merge(train, frozen):
        return train if frozen is None else merge_trainable(train, frozen)

    def loss_fn(params, batch):
        # The heads run on the response window only: logits [mb, N, V], values [mb, N].
        N = batch["masks"].shape[1]
        P = batch["input_ids"].shape[1] - N
        out = apply_windowed(
            module, {"params": params}, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
            deterministic=True, logits_window=response_window(P, N),
        )
        logprobs, entropy = logprobs_and_entropy(out.logits, batch["input_ids"][:, P:])
        vpreds = out.values.astype(jnp.float32)
        pg_loss, vf_loss, stats = ppo_loss(
            batch["logprobs"], batch["values"], None, vpreds, logprobs, batch["masks"], batch["advantages"],
            batch["returns"], cliprange=config.cliprange, cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef, ratio_threshold=config.ratio_threshold, entropy=entropy,
        )
        return pg_loss + vf_loss, stats

    # Differentiate the trainable leaves only (all of them without ``trainable``).
    def split_loss(train, frozen, batch):
        return loss_fn(merge(train, frozen), batch)

    grad_fn = jax.value_and_grad(split_loss, has_aux=True)

    def make_epoch(tx, data):
        """One PPO epoch over ``data`` (the [B, ...] arrays), as a ``lax.scan`` body."""

        def backward_batch(carry, inputs):
            """GA minibatches -> averaged grads -> one update (unless all skipped)."""
            params, opt_state = carry
            batches = inputs  # leaves [GA, mb, ...]
            train, frozen = split(params)

            def minibatch(grads_acc, batch):
                batch = constrain_batch(batch, mesh)  # [mb, ...]: rows stay split over (data, fsdp)
                (_, stats), grads = grad_fn(train, frozen, batch)
                keep = 1.0 - stats["skipped"]
                grads = jax.tree_util.tree_map(lambda g: jnp.where(keep > 0, g, 0.0), grads)
                return jax.tree_util.tree_map(jnp.add, grads_acc, grads), stats

            zeros = jax.tree_util.tree_map(jnp.zeros_like, train)
            grads, stats = jax.lax.scan(minibatch, zeros, batches)
            grads = jax.tree_util.tree_map(lambda g: g / GA, grads)
            if frozen is not None:  # tx sees the whole tree; its frozen leaves get zero (unused) updates
                grads = merge(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_train = optax.apply_updates(train, split(updates)[0])
            all_skipped = jnp.all(stats["skipped"] > 0)
            pick = lambda new, old: jnp.where(all_skipped, old, new)  # noqa: E731
            params = merge(jax.tree_util.tree_map(pick, new_train, train), frozen)
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
        data = jax.tree_util.tree_map(jnp.asarray, data)  # host (numpy) rollouts: gather with traced perm
        rng, step_key = jax.random.split(state.rng)
        carry = (state.params, state.opt_state, jnp.array(False))
        epoch = make_epoch(tx, data)
        (params, opt_state, _), (mb_stats, ran) = jax.lax.scan(epoch, carry, jax.random.split(step_key, epochs))
        # mb_stats leaves: [epochs, n_bb, GA, ...]; average the minibatches that ran (TRL: stack + mean).
        weight = jnp.broadcast_to(ran[:, None, None], (epochs, n_bb, GA)).astype(jnp.float32)
        train_stats = {}
        for key, v in mb_stats.items():
            if key in ("policy/advantages", "policy/ratio"):
                # TRL: flattened, not averaged. Static shape [epochs * B * N]: epochs skipped by
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
    ``[ppo_epochs * B * N]``) to the ``ppo/epochs_run`` epochs that ran, as TRL leaves the
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


def check_prompt_bank(prompts: Any, prompt_mask: Any, batch_size: int) -> None:
    """Host-side checks of a prompt bank (``make_train``'s ``train`` runs them on concrete
    arguments; under ``jax.jit`` only the shapes are checked, so call this first): rank 2,
    equal shapes, at least ``batch_size`` prompts, left padding. Raises ``ValueError``."""
    chex.assert_rank([prompts, prompt_mask], 2)
    chex.assert_equal_shape([prompts, prompt_mask])
    n = prompts.shape[0]
    if n < batch_size:
        raise ValueError(f"The prompt bank has {n} prompts, fewer than batch_size={batch_size}.")
    if not isinstance(prompt_mask, jax.core.Tracer):  # a concrete bank: check its padding
        from rljax.generation import _check_left_padded

        try:
            _check_left_padded(prompt_mask)
        except ValueError as e:
            raise ValueError(f"make_train: prompt_mask: {e}") from None


def make_train(
    module: Any,
    config: PPOConfig,
    generate_fn: Callable,
    reward_fn: Callable[[Any, Rollout], Array],
    num_steps: int,
    *,
    tx: Optional[optax.GradientTransformation] = None,
    trainable: Optional[Any] = None,
) -> Callable:
    """``train(state, reward_params, prompts, prompt_mask) -> (state, stats)``: ``num_steps`` PPO
    iterations in one ``lax.scan``.

    Large things are ARGUMENTS, not closures (a closed-over array is a constant baked into the
    compiled program): the reward model's params ``reward_params`` (any pytree, None for a
    parameter-free reward) and the left-padded prompt bank ``prompts``/``prompt_mask``
    [num_prompts, P]. Each iteration takes ``batch_size`` prompts, rolls out, scores with the
    JAX ``reward_fn(reward_params, rollout) -> [B]`` (raw scores, logged as
    ``env/reward_mean``) and runs ``ppo_step`` (built with ``tx``, default the config's Adam,
    and ``trainable``: see ``make_ppo_step``).

    Prompt sampling: epochs over the bank. At the start of ``train`` and whenever an epoch is
    used up, one permutation of the bank is drawn (keys from ``state.rng``); iteration ``i`` of
    an epoch takes its ``i``-th block of ``batch_size`` prompts, so prompts are drawn without
    replacement within an epoch and the last ``num_prompts % batch_size`` of each permutation
    are left out of that epoch (``drop_last``). The bank is permuted once per
    ``num_prompts // batch_size`` iterations, not every iteration; each ``train`` call starts a
    fresh epoch.

    ``stats`` holds the scalar stats in ``SCALAR_STAT_KEYS`` plus ``env/reward_mean``, each
    ``[num_steps]`` (``ppo/skipped_nonfinite_scores`` counts the iterations whose rewards were
    not finite and were therefore skipped). ``reward_fn`` must return ``[batch_size]`` (checked
    at trace time); the bank is checked by ``check_prompt_bank`` (its padding only when
    concrete). ``jax.jit(train)``; ``jax.vmap(train, in_axes=(0, None, None, None))`` trains
    several seeds at once.
    """
    B = config.batch_size
    rollout_fn = make_rollout(module, generate_fn, config.kl_penalty, chunk_size=config.mini_batch_size)
    ppo_step = make_ppo_step(module, config, tx=tx, trainable=trainable)

    def train(state: PPOTrainState, reward_params: Any, prompts: Array, prompt_mask: Array):
        check_prompt_bank(prompts, prompt_mask, B)
        prompts, prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)
        n = prompts.shape[0]
        per_epoch = n // B
        rng, epoch_key = jax.random.split(state.rng)
        state = state.replace(rng=rng)

        def _update_step(carry, i):
            state, order = carry
            slot = i % per_epoch
            order = jax.lax.cond(  # a new permutation only when an epoch starts
                (slot == 0) & (i > 0),
                lambda: jax.random.permutation(jax.random.fold_in(epoch_key, i // per_epoch), n),
                lambda: order,
            )
            idx = jax.lax.dynamic_slice_in_dim(order, slot * B, B)
            rng, k_gen = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            rollout = rollout_fn(state, prompts[idx], prompt_mask[idx], k_gen)
            scores = reward_fn(reward_params, rollout)
            if jnp.shape(scores) != (B,):
                raise ValueError(
                    f"reward_fn must return one score per rollout row, shape ({B},); it returned shape "
                    f"{jnp.shape(scores)}. Reduce per-token rewards to a sequence score (e.g. .sum(-1))."
                )
            state, stats = ppo_step(state, rollout, scores)
            out = {k: stats[k] for k in SCALAR_STAT_KEYS}
            out["env/reward_mean"] = jnp.mean(scores)
            return (state, order), out

        order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), n)
        (state, _), stats = jax.lax.scan(_update_step, (state, order), jnp.arange(num_steps))
        return state, stats

    return train
