"""Generate and score a batch: log-probs, reference log-probs and values of responses.

Shared by the on-policy algorithms (PPO, GRPO, RLOO): they import this module, not each
other. Everything here is pure and jittable; nothing is jitted here.

Sequence layout: ``input_ids = [left-padded query (P) | right-padded response (N)]``.
Because queries are left-padded, every row's response starts at column ``P``, so the
distributions that score the response tokens sit at the FIXED columns ``P-1 .. P+N-2``
(the "response window"). The LM head (and the value head) run on that window only
(``logits_window=(P-1, N)``), so every per-token array is ``[B, N]``, aligned with the
responses: ``logprobs[:, j] = log p(responses[:, j] | query, responses[:, :j])``.

Memory: forwards run ``chunk_size`` rows at a time (``chunked_rows``; PPO passes
``mini_batch_size``, TRL's ``batched_forward_pass``), so the activations and the
``[rows, N, V]`` logits are those of one chunk whatever the batch size. The log-prob of
the taken token and the entropy come from one ``logsumexp`` (``logprobs_and_entropy``).

Reference model: ``ref_params=None`` means "the reference is ``ref_module`` applied to the
POLICY's params" (PEFT: the same LoRA-wrapped module with adapters disabled, no second copy
of the weights).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import chex
import flax
import jax
import jax.numpy as jnp

from rljax.core import logprobs_and_entropy
from rljax.models.attention import apply_windowed, default_position_ids
from rljax.ppo import kl_penalty
from rljax.sharding import constrain_batch

Array = jax.Array


# ==========================================================================
# Scores of the response tokens, [B, N]
# ==========================================================================


@flax.struct.dataclass
class ResponseScores:
    """``logprobs`` [B, N] float32: log p(response token j | query, responses[:j]);
    ``values`` [B, N] float32 (the value head at the position that predicts token j) or None;
    ``entropy`` [B, N] float32 (entropy of that position's distribution) or None."""

    logprobs: Array
    values: Optional[Array] = None
    entropy: Optional[Array] = None


def sequence_inputs(queries: Array, query_mask: Array, responses: Array, response_mask: Array):
    """``(input_ids, attention_mask, position_ids, masks)`` of ``[query | response]``:
    ids/mask/positions [B, P+N]; ``masks`` [B, N] float32, the response mask (1 where the
    response token counts), aligned with the response window."""
    input_ids = jnp.concatenate([queries, responses], axis=1)
    attention_mask = jnp.concatenate([query_mask, response_mask], axis=1).astype(jnp.int32)
    position_ids = default_position_ids(attention_mask)
    return input_ids, attention_mask, position_ids, response_mask.astype(jnp.float32)


def response_window(query_len: int, response_len: int) -> tuple:
    """``logits_window`` of the response tokens: ``(P-1, N)`` (columns ``P-1 .. P+N-2``)."""
    return (query_len - 1, response_len)


def _check_pair(queries, query_mask, responses, response_mask) -> None:
    chex.assert_rank([queries, query_mask, responses, response_mask], 2)
    chex.assert_equal_shape([queries, query_mask])
    chex.assert_equal_shape([responses, response_mask])
    chex.assert_equal_shape_prefix([queries, responses], 1)


def chunked_rows(fn: Callable, chunk_size: Optional[int], *arrays: Any) -> Any:
    """``fn(*arrays)`` computed ``chunk_size`` rows at a time (``lax.map`` over chunks), so the
    peak memory of ``fn``'s intermediates is that of one chunk. ``arrays``: pytrees whose
    leaves are [B, ...]; ``fn`` maps rows to rows (output leaves [rows, ...]; None passes).
    ``chunk_size`` None (or >= B) calls ``fn`` once; B must be a multiple of ``chunk_size``.

    Chunk ``k`` holds rows ``k, k + n, k + 2n, ...`` (``n = B // chunk_size``): on a mesh the
    batch axis is split in contiguous blocks, so every chunk keeps its rows spread over all
    devices (each chunk is constrained to the batch axes) instead of sitting on one of them.
    Rows are independent (eval mode), so the results do not depend on the grouping.
    """
    leaves = jax.tree_util.tree_leaves(arrays)
    B = leaves[0].shape[0]
    if chunk_size is None or chunk_size >= B:
        return fn(*arrays)
    if chunk_size < 1 or B % chunk_size:
        raise ValueError(
            f"chunk_size={chunk_size} must be a positive divisor of the batch size {B} "
            "(set mini_batch_size to a divisor of batch_size)."
        )
    n = B // chunk_size
    split = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x.reshape(chunk_size, n, *x.shape[1:]), 0, 1), arrays)
    split = constrain_batch(split, batch_axis=1)  # [n, chunk, ...]: each chunk's rows on every device
    out = jax.lax.map(lambda xs: fn(*constrain_batch(xs)), split)
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(B, *x.shape[2:]), out)


def _window_forward(module, params, input_ids, attention_mask, position_ids, window):
    return apply_windowed(module, {"params": params}, input_ids, attention_mask, position_ids,
                          deterministic=True, logits_window=window)


def response_logprobs(
    module: Any,
    params: Any,
    queries: Array,
    query_mask: Array,
    responses: Array,
    response_mask: Array,
    *,
    return_values: bool = False,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
) -> ResponseScores:
    """Score ``responses`` [B, N] (right-padded) after ``queries`` [B, P] (left-padded).

    One forward pass of ``module`` (eval mode, no dropout) over ``[query | response]``, with
    the LM head on the response window only. ``return_values`` needs a value-head module
    (``.values``); ``chunk_size``: rows per forward (see ``chunked_rows``). ``temperature``:
    log-probs and entropy of ``softmax(logits / temperature)``, the distribution sampling at
    that temperature drew from (later TRL's GRPO/RLOO; 1.0, PPO's, leaves the logits alone).
    Returns ``ResponseScores`` with [B, N] float32 arrays (finite junk where ``response_mask``
    is 0).
    """
    _check_pair(queries, query_mask, responses, response_mask)
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score sampled tokens, got {temperature}.")
    window = response_window(queries.shape[1], responses.shape[1])
    scale = not (isinstance(temperature, (int, float)) and temperature == 1.0)

    def score(q, qm, r, rm):
        input_ids, attention_mask, position_ids, _ = sequence_inputs(q, qm, r, rm)
        out = _window_forward(module, params, input_ids, attention_mask, position_ids, window)
        logits = out.logits / temperature if scale else out.logits
        logprobs, entropy = logprobs_and_entropy(logits, r, with_entropy=return_entropy)
        values = out.values.astype(jnp.float32) if return_values else None
        return ResponseScores(logprobs=logprobs, values=values, entropy=entropy)

    return chunked_rows(score, chunk_size, queries, query_mask, responses, response_mask)


# ==========================================================================
# PPO's rollout (TRL's batched_forward_pass), [B, N]
# ==========================================================================


@flax.struct.dataclass
class PolicyTrainState:
    """State of a critic-free policy-gradient loop (GRPO, RLOO): policy params, frozen reference
    params (None: the reference is ``ref_module`` on the policy's params, e.g. PEFT with adapters
    off, or unused), optimizer state (the optax transformation belongs to the step), update
    counter and PRNG key."""

    step: Array
    params: Any
    ref_params: Any
    opt_state: Any
    rng: Array

    @classmethod
    def create(cls, params: Any, tx: Any, ref_params: Any = None, rng: Optional[Array] = None) -> "PolicyTrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, ref_params=ref_params, opt_state=tx.init(params),
                   rng=jax.random.PRNGKey(0) if rng is None else rng)


def generation_temperature(generate_fn: Callable) -> Optional[float]:
    """The sampling temperature baked into a ``rljax.generation.make_generate_fn`` function
    (jitted or not); None when it cannot be read (any other callable) or it decodes greedily."""
    fn = getattr(generate_fn, "__wrapped__", generate_fn)
    settings = fn.args[1] if isinstance(fn, functools.partial) and len(fn.args) > 1 else None
    if settings is None or not hasattr(settings, "temperature") or not getattr(settings, "do_sample", True):
        return None
    return float(settings.temperature)


def check_temperature(generate_fn: Callable, temperature: float, owner: str) -> None:
    """Raise when ``generate_fn`` samples at a temperature other than ``temperature`` (the one the
    log-probs divide the logits by): the ratio and KL would compare different distributions."""
    t = generation_temperature(generate_fn)
    if t is not None and abs(t - float(temperature)) > 1e-12:
        raise ValueError(
            f"generate_fn samples at temperature={t} but {owner}.temperature={temperature}: the log-probs must "
            f"score the sampling distribution. Pass {owner}(temperature={t}, ...) or build generate_fn with "
            f"temperature={temperature}."
        )


def sample_groups(generate_fn: Callable, params: Any, prompts: Array, prompt_mask: Array, group_size: int,
                  rng: Array) -> Tuple[Array, Array, Array, Array]:
    """Each prompt repeated ``group_size`` times (a group's rows adjacent) and sampled in one call.

    ``prompts``/``prompt_mask`` [Bp, P] left-padded; ``generate_fn(params, ids, mask, rng)`` as
    ``rljax.generation.make_generate_fn``. Returns ``(prompts, prompt_mask, completions,
    completion_mask)``: [Bp*G, P] int32 twice, then [Bp*G, N] and its int32 mask."""
    chex.assert_rank([prompts, prompt_mask], 2)
    prompts = jnp.repeat(jnp.asarray(prompts, jnp.int32), group_size, axis=0)
    prompt_mask = jnp.repeat(jnp.asarray(prompt_mask, jnp.int32), group_size, axis=0)
    gen = generate_fn(params, prompts, prompt_mask, rng)
    return prompts, prompt_mask, gen.sequences[:, prompts.shape[1]:], gen.response_mask.astype(jnp.int32)


@flax.struct.dataclass
class Rollout:
    """One batch of experience. ``B`` batch, ``P`` query length, ``N`` response length.
    Per-token arrays are [B, N], aligned with ``responses`` (TRL keeps the shifted
    ``[B, P+N-1]`` layout; its query columns are masked out and never read)."""

    queries: Array  # [B, P] left-padded
    query_mask: Array  # [B, P]
    responses: Array  # [B, N] right-padded
    response_mask: Array  # [B, N]
    logprobs: Array  # [B, N] policy log-prob of response token j (rollout = "old")
    ref_logprobs: Array  # [B, N]
    values: Array  # [B, N] value at the position that predicts token j
    masks: Array  # [B, N] float, 1 where token j counts (response_mask, times any extra mask)
    kls: Optional[Array] = None  # [B, N] precomputed for kl_penalty="full" (needs full distributions)

    @property
    def input_ids(self) -> Array:
        return jnp.concatenate([self.queries, self.responses], axis=1)

    @property
    def attention_mask(self) -> Array:
        return jnp.concatenate([self.query_mask, self.response_mask], axis=1)


def make_forward_rollout(
    module: Any, kl_penalty_mode: str = "kl", ref_module: Optional[Any] = None, chunk_size: Optional[int] = None
) -> Callable:
    """``forward(params, ref_params, queries, query_mask, responses, response_mask) -> Rollout``.

    ``module``'s output must have ``.logits`` and ``.values`` (a value-head model);
    ``ref_module`` (default: ``module``) only needs ``.logits``. ``ref_params=None``: the
    reference is ``ref_module`` applied to ``params`` (PEFT: adapters off). Eval mode (no
    dropout), as TRL's ``batched_forward_pass``; ``chunk_size`` rows at a time (PPO:
    ``mini_batch_size``). Not jitted itself: call it inside your own jit.
    """
    ref_module = module if ref_module is None else ref_module
    full_kl = kl_penalty_mode == "full"

    def forward(params, ref_params, queries, query_mask, responses, response_mask) -> Rollout:
        _check_pair(queries, query_mask, responses, response_mask)
        window = response_window(queries.shape[1], responses.shape[1])
        ref_p = params if ref_params is None else ref_params

        def score(q, qm, r, rm):
            input_ids, attention_mask, position_ids, _ = sequence_inputs(q, qm, r, rm)
            input_ids, attention_mask, position_ids = constrain_batch((input_ids, attention_mask, position_ids))
            out = _window_forward(module, params, input_ids, attention_mask, position_ids, window)
            ref_out = _window_forward(ref_module, ref_p, input_ids, attention_mask, position_ids, window)
            logprobs, _ = logprobs_and_entropy(out.logits, r, with_entropy=False)
            ref_logprobs, _ = logprobs_and_entropy(ref_out.logits, r, with_entropy=False)
            kls = None
            if full_kl:
                kls = kl_penalty(jax.nn.log_softmax(out.logits, -1), jax.nn.log_softmax(ref_out.logits, -1), "full")
            return logprobs, ref_logprobs, out.values.astype(jnp.float32), kls

        logprobs, ref_logprobs, values, kls = chunked_rows(
            score, chunk_size, queries, query_mask, responses, response_mask
        )
        return Rollout(
            queries=queries,
            query_mask=query_mask,
            responses=responses,
            response_mask=response_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            masks=response_mask.astype(jnp.float32),
            kls=kls,
        )

    return forward


def make_rollout(
    module: Any,
    generate_fn: Callable,
    kl_penalty_mode: str = "kl",
    ref_module: Optional[Any] = None,
    chunk_size: Optional[int] = None,
) -> Callable:
    """``rollout(state, prompts [B, P], prompt_mask [B, P], rng) -> Rollout``: generate and
    score in one function (jit it, or call it inside a jitted loop). ``state``: anything with
    ``.params`` and ``.ref_params`` (e.g. ``rljax.ppo_train.PPOTrainState``); ``ref_params``
    None means ``ref_module`` on the policy's params (see ``make_forward_rollout``, as is
    ``chunk_size``).

    ``generate_fn(params, input_ids, attention_mask, rng)`` returns an object with
    ``.sequences`` [B, P+N] and ``.response_mask`` [B, N] (see ``rljax.generation.make_generate_fn``).
    """
    forward = make_forward_rollout(module, kl_penalty_mode, ref_module, chunk_size)

    def rollout(state: Any, prompts: Array, prompt_mask: Array, rng: Array) -> Rollout:
        gen = generate_fn(state.params, prompts, prompt_mask, rng)
        responses = gen.sequences[:, prompts.shape[1] :]
        return forward(state.params, state.ref_params, prompts, prompt_mask, responses, gen.response_mask)

    return rollout


__all__ = [
    "ResponseScores",
    "Rollout",
    "check_temperature",
    "chunked_rows",
    "generation_temperature",
    "make_forward_rollout",
    "make_rollout",
    "response_logprobs",
    "response_window",
    "sequence_inputs",
]
