"""Generate and score a batch: log-probs, reference log-probs and values of responses.

Shared by the on-policy algorithms (PPO, GRPO, RLOO): they import this module, not each
other. Everything here is pure and jittable; nothing is jitted here.

Sequence layout: ``input_ids = [left-padded query (P) | right-padded response (N)]``.
Because queries are left-padded, every row's response starts at column ``P``, so the
distributions that score the response tokens sit at the FIXED columns ``P-1 .. P+N-2``
(the "response window"): ``response_logprobs`` returns ``[B, N]`` arrays,
``logprobs[:, j] = log p(responses[:, j] | query, responses[:, :j])``.

PPO's ``Rollout`` keeps TRL's shifted ``[B, P+N-1]`` layout: position ``t`` is about
predicting token ``t+1``, and ``masks[:, t] = 1`` iff token ``t+1`` is a real response token.

Reference model: ``ref_params=None`` means "the reference is ``ref_module`` applied to the
POLICY's params" (PEFT: the same LoRA-wrapped module with adapters disabled, no second copy
of the weights).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import flax
import jax
import jax.numpy as jnp

from rljax.core import entropy_from_logits, logprobs_from_logits
from rljax.models.attention import default_position_ids
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
    ids/mask/positions [B, P+N]; ``masks`` [B, P+N-1] float32, 1 where token t+1 is a response token."""
    input_ids = jnp.concatenate([queries, responses], axis=1)
    attention_mask = jnp.concatenate([query_mask, response_mask], axis=1).astype(jnp.int32)
    position_ids = default_position_ids(attention_mask)
    masks = jnp.concatenate([jnp.zeros_like(query_mask[:, 1:]), response_mask], axis=1).astype(jnp.float32)
    return input_ids, attention_mask, position_ids, masks


def _check_pair(queries, query_mask, responses, response_mask) -> None:
    chex.assert_rank([queries, query_mask, responses, response_mask], 2)
    chex.assert_equal_shape([queries, query_mask])
    chex.assert_equal_shape([responses, response_mask])
    chex.assert_equal_shape_prefix([queries, responses], 1)


def chunked_rows(fn: Callable, chunk_size: Optional[int], *arrays: Any) -> Any:
    """``fn(*arrays)`` computed ``chunk_size`` rows at a time (``lax.map`` over chunks), so the
    peak memory of ``fn``'s intermediates is that of one chunk. ``arrays``: pytrees whose
    leaves are [B, ...]; ``fn``'s output leaves must be [rows, ...] (None leaves pass through).
    ``chunk_size`` None (or >= B) calls ``fn`` once. B must be a multiple of ``chunk_size``."""
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
    split = jax.tree_util.tree_map(lambda x: x.reshape(n, chunk_size, *x.shape[1:]), arrays)
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree_util.tree_map(lambda x: x.reshape(B, *x.shape[2:]), out)


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
) -> ResponseScores:
    """Score ``responses`` [B, N] (right-padded) after ``queries`` [B, P] (left-padded).

    One forward pass of ``module`` (eval mode, no dropout) over ``[query | response]``;
    the log-probs of the taken tokens come from the response window only (columns
    ``P-1 .. P+N-2``). ``return_values`` needs a value-head module (``.values``);
    ``chunk_size``: rows per forward (see ``chunked_rows``). Returns ``ResponseScores``
    with [B, N] float32 arrays (positions where ``response_mask`` is 0 hold finite junk).
    """
    _check_pair(queries, query_mask, responses, response_mask)
    P, N = queries.shape[1], responses.shape[1]

    def score(q, qm, r, rm):
        input_ids, attention_mask, position_ids, _ = sequence_inputs(q, qm, r, rm)
        input_ids, attention_mask, position_ids = constrain_batch((input_ids, attention_mask, position_ids))
        out = module.apply({"params": params}, input_ids, attention_mask, position_ids, deterministic=True)
        logits = out.logits[:, P - 1 : P + N - 1]
        logprobs = logprobs_from_logits(logits, r)
        values = out.values[:, P - 1 : P + N - 1].astype(jnp.float32) if return_values else None
        entropy = None
        if return_entropy:
            entropy = entropy_from_logits(logits)
        return ResponseScores(logprobs=logprobs, values=values, entropy=entropy)

    return chunked_rows(score, chunk_size, queries, query_mask, responses, response_mask)


# ==========================================================================
# PPO's rollout (TRL's batched_forward_pass), [B, P+N-1]
# ==========================================================================


@flax.struct.dataclass
class Rollout:
    """One batch of experience. ``B`` batch, ``P`` query length, ``N`` response
    length, ``T = P + N - 1`` (TRL's shifted length)."""

    queries: Array  # [B, P] left-padded
    query_mask: Array  # [B, P]
    responses: Array  # [B, N] right-padded
    response_mask: Array  # [B, N]
    logprobs: Array  # [B, T] policy log-probs of token t+1 (rollout = "old")
    ref_logprobs: Array  # [B, T]
    values: Array  # [B, T]
    masks: Array  # [B, T] 1 where token t+1 is a response token
    kls: Optional[Array] = None  # [B, T] precomputed for kl_penalty="full" (needs full distributions)

    @property
    def input_ids(self) -> Array:
        return jnp.concatenate([self.queries, self.responses], axis=1)

    @property
    def attention_mask(self) -> Array:
        return jnp.concatenate([self.query_mask, self.response_mask], axis=1)


def make_forward_rollout(module: Any, kl_penalty_mode: str = "kl", ref_module: Optional[Any] = None) -> Callable:
    """``forward(params, ref_params, queries, query_mask, responses, response_mask) -> Rollout``.

    ``module``'s output must have ``.logits`` [B, S, V] and ``.values`` [B, S] (a value-head
    model); ``ref_module`` (default: ``module``) only needs ``.logits``. ``ref_params=None``:
    the reference is ``ref_module`` applied to ``params`` (PEFT: adapters off). Eval mode (no
    dropout), as TRL's ``batched_forward_pass``. Not jitted itself: call it inside your own jit.
    """
    ref_module = module if ref_module is None else ref_module

    def forward(params, ref_params, queries, query_mask, responses, response_mask) -> Rollout:
        _check_pair(queries, query_mask, responses, response_mask)
        input_ids, attention_mask, position_ids, masks = sequence_inputs(queries, query_mask, responses, response_mask)
        input_ids, attention_mask, position_ids = constrain_batch((input_ids, attention_mask, position_ids))
        ref_p = params if ref_params is None else ref_params
        out = module.apply({"params": params}, input_ids, attention_mask, position_ids, deterministic=True)
        ref_out = ref_module.apply({"params": ref_p}, input_ids, attention_mask, position_ids, deterministic=True)
        labels = input_ids[:, 1:]
        logits, ref_logits = out.logits[:, :-1], ref_out.logits[:, :-1]
        kls = None
        if kl_penalty_mode == "full":
            kls = kl_penalty(jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(ref_logits, -1), "full")
        return Rollout(
            queries=queries,
            query_mask=query_mask,
            responses=responses,
            response_mask=response_mask,
            logprobs=logprobs_from_logits(logits, labels),
            ref_logprobs=logprobs_from_logits(ref_logits, labels),
            values=out.values[:, :-1].astype(jnp.float32),
            masks=masks,
            kls=kls,
        )

    return forward


def make_rollout(
    module: Any, generate_fn: Callable, kl_penalty_mode: str = "kl", ref_module: Optional[Any] = None
) -> Callable:
    """``rollout(state, prompts [B, P], prompt_mask [B, P], rng) -> Rollout``: generate and
    score in one function (jit it, or call it inside a jitted loop). ``state``: anything with
    ``.params`` and ``.ref_params`` (e.g. ``rljax.ppo_train.PPOTrainState``); ``ref_params``
    None means ``ref_module`` on the policy's params (see ``make_forward_rollout``).

    ``generate_fn(params, input_ids, attention_mask, rng)`` returns an object with
    ``.sequences`` [B, P+N] and ``.response_mask`` [B, N] (see ``rljax.generation.make_generate_fn``).
    """
    forward = make_forward_rollout(module, kl_penalty_mode, ref_module)

    def rollout(state: Any, prompts: Array, prompt_mask: Array, rng: Array) -> Rollout:
        gen = generate_fn(state.params, prompts, prompt_mask, rng)
        responses = gen.sequences[:, prompts.shape[1] :]
        return forward(state.params, state.ref_params, prompts, prompt_mask, responses, gen.response_mask)

    return rollout


__all__ = [
    "ResponseScores",
    "Rollout",
    "chunked_rows",
    "make_forward_rollout",
    "make_rollout",
    "response_logprobs",
    "sequence_inputs",
]
