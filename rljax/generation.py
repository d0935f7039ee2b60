"""Jitted sampling from causal LMs with a preallocated KV cache.

One compiled function per (model, static settings) does the whole job: a
single prefill call over the left-padded prompt, then a ``lax.while_loop``
that decodes one token per step and stops as soon as every row has emitted
eos. Nothing in the core leaves the device, so PPO can call it inside a
larger ``jax.jit``.

Public pieces:

- ``generate(model, params, input_ids, attention_mask, rng, *, max_new_tokens,
  ...) -> GenerationOutput``: validated, cached entry point.
- ``make_generate_fn(model, *, max_new_tokens, ...) -> fn(params, input_ids,
  attention_mask, rng)``: the jitted core for composing your own loops.
- ``filter_logits`` / ``sample_logits``: temperature, top-k and top-p (HF
  semantics) as pure functions of a logits array.
- ``respond_to_batch``: TRL's ``trl.core.respond_to_batch``.
- ``strip_responses``: host-side unpadding of responses, like TRL's
  ``PPOTrainer._generate_batched(remove_padding=True)``.

Prompts must be LEFT-padded (``tokenizer.padding_side = "left"``): every row's
last prompt token sits in the last column, so the prefill's final logits are
each row's next-token distribution. Positions are ``cumsum(mask) - 1`` over the
prompt and continue from each row's own token count for the new tokens, as HF
does.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import apply_windowed
from rljax.sharding import constrain_batch

Array = jax.Array
TokenIds = Union[None, int, Sequence[int]]

# Number of times the generation core has been traced, keyed by settings.
# Tests use it to prove that repeated calls do not recompile.
TRACE_COUNTS: "collections.Counter[Any]" = collections.Counter()


@flax.struct.dataclass
class GenerationOutput:
    """Result of ``generate``.

    sequences:     [batch, prompt_len + max_new_tokens] int32: the prompt exactly as
                   given (left padding kept), then the new tokens; after a row's
                   first eos every slot holds ``pad_token_id``.
    response_mask: [batch, max_new_tokens] int32: 1 for generated tokens up to and
                   including the first eos, 0 after it.
    logprobs:      [batch, max_new_tokens] float32 or None: RAW
                   ``log_softmax(logits)`` of the model at temperature 1 (before
                   min_new_tokens, temperature, top-k, top-p), gathered at the
                   sampled token. This is what PPO needs as "old logprobs". 0
                   where response_mask is 0.
    values:        [batch, max_new_tokens] float32 or None: the value head's
                   output at the position that predicted each token (TRL's
                   ``values[:, :-1]`` alignment). 0 where response_mask is 0.
    """

    sequences: Array
    response_mask: Array
    logprobs: Optional[Array] = None
    values: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The static (compile-time) part of a generation call; hashable."""

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    return_logprobs: bool = False
    return_values: bool = False
    cache_dtype: Any = None
    # Token-id sequences that end a row like eos (kept in the response; pad after).
    stop_sequences: Tuple[Tuple[int, ...], ...] = ()


# --------------------------------------------------------------------------
# Logits processing and sampling (pure, jittable)
# --------------------------------------------------------------------------


def _is_static(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating))


def _top_k_filter(logits: Array, top_k: int) -> Array:
    k = min(int(top_k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p_filter(logits: Array, top_p) -> Array:
    # HF nucleus: keep the smallest set of most likely tokens whose probability
    # sums to >= top_p. In descending order, token i is kept iff the mass
    # strictly before it is < top_p, so the top token always survives.
    desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits: Array, temperature=1.0, top_k: int = 0, top_p=1.0) -> Array:
    """Apply temperature, then top-k, then top-p (HF's warper order) to ``logits``.

    logits: [..., vocab]. Returns float32 logits of the same shape with removed
    tokens at ``-inf``. ``top_k`` (0 = off) must be a Python int; ``temperature``
    and ``top_p`` (1.0 = off) may be Python floats or traced scalars.
    """
    logits = logits.astype(jnp.float32)
    if not (_is_static(temperature) and float(temperature) == 1.0):
        logits = logits / temperature
    if top_k and top_k > 0:
        logits = _top_k_filter(logits, top_k)
    if not (_is_static(top_p) and float(top_p) >= 1.0):
        logits = _top_p_filter(logits, top_p)
    return logits


def sample_logits(logits: Array, rng: Array, temperature=1.0, top_k: int = 0, top_p=1.0) -> Array:
    """Sample one token per row from ``filter_logits(logits, ...)``.

    logits: [..., vocab]; rng: a PRNG key. Returns int32 token ids [...].
    """
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return sample_categorical(rng, filtered)


def sample_categorical(rng: Array, logits: Array) -> Array:
    """Draw one index per row from ``softmax(logits)`` by inverse-CDF sampling.

    logits: [..., V] float; ``-inf`` entries have probability 0 and are never drawn.
    Returns int32 ids [...]. Same distribution as ``jax.random.categorical`` (a different
    random stream), but one uniform per row instead of V Gumbel draws: at GPT-2's
    V = 50257 the Gumbel noise cost more than the LM-head matmul of a small model.

    ``cdf = cumsum(exp(logits - max))`` (unnormalised, so no divide) and
    ``u = (1 - uniform[0, 1)) * cdf[-1]`` lies in (0, total]; the drawn index is the first
    ``i`` with ``cdf[i] >= u`` = ``sum(cdf < u)``. A zero-probability token ``i`` has
    ``cdf[i] == cdf[i - 1]`` (or 0 at ``i = 0``), so it is never the first to reach ``u > 0``.
    float32 cumsum error: a prefix sum of V non-negative terms is off by at most
    V * eps * cdf[-1] (sequential order; eps = 6e-8), i.e. <= 3e-3 of the total mass at
    V = 50257 as a hard bound; XLA's blocked scan does far better: against a float64
    cumsum on [16, 50257] rows of N(0, s^2) logits (s = 1, 3, 10) the largest error was
    4e-7 of the total, so each token's probability moves by <= ~1e-6 absolute (a masked
    token's stays exactly 0).
    """
    logits = logits.astype(jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    cdf = jnp.cumsum(jnp.exp(logits - m), axis=-1)
    u = (1.0 - jax.random.uniform(rng, logits.shape[:-1] + (1,), jnp.float32)) * cdf[..., -1:]
    index = jnp.sum(cdf < u, axis=-1)
    return jnp.minimum(index, logits.shape[-1] - 1).astype(jnp.int32)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _eos_tuple(eos_token_id: TokenIds) -> Tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def _stop_tuple(stop_sequences) -> Tuple[Tuple[int, ...], ...]:
    """Normalise ``stop_sequences`` (one id sequence or several) to a tuple of int tuples."""
    if stop_sequences is None or len(stop_sequences) == 0:
        return ()
    if isinstance(stop_sequences[0], (int, np.integer)):
        stop_sequences = [stop_sequences]
    out = tuple(dict.fromkeys(tuple(int(i) for i in seq) for seq in stop_sequences))
    if any(len(seq) == 0 for seq in out):
        raise ValueError("stop_sequences holds an empty sequence; every stop sequence needs at least one token id.")
    return out


def _settings(
    *,
    max_new_tokens,
    do_sample,
    temperature,
    top_k,
    top_p,
    min_new_tokens,
    eos_token_id,
    pad_token_id,
    return_logprobs,
    return_values,
    cache_dtype,
    stop_sequences=None,
) -> GenerationSettings:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if do_sample and not float(temperature) > 0:
        raise ValueError(
            f"temperature must be > 0 when do_sample=True, got {temperature}; "
            "for greedy decoding pass do_sample=False instead of temperature=0."
        )
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use top_p=1.0 to turn nucleus sampling off.")
    # TRL's examples pass top_k=0.0; accept integral floats.
    if isinstance(top_k, bool) or not float(top_k).is_integer() or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {top_k!r}.")
    if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}.")
    if min_new_tokens > max_new_tokens:
        raise ValueError(
            f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}: eos could never be "
            "allowed; lower min_new_tokens or raise max_new_tokens."
        )
    eos = _eos_tuple(eos_token_id)
    stops = _stop_tuple(stop_sequences)
    if stops and pad_token_id is None:
        raise ValueError("stop_sequences is set but pad_token_id is None: rows that stop early need a pad token. "
                         "Pass pad_token_id, e.g. pad_token_id=tokenizer.pad_token_id.")
    if eos and pad_token_id is None:
        raise ValueError(
            "eos_token_id is set but pad_token_id is None: rows that finish early need a pad token. "
            "Pass pad_token_id, e.g. pad_token_id=tokenizer.pad_token_id or pad_token_id=tokenizer.eos_token_id."
        )
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        min_new_tokens=int(min_new_tokens),
        eos_token_id=eos,
        pad_token_id=None if pad_token_id is None else int(pad_token_id),
        return_logprobs=bool(return_logprobs),
        return_values=bool(return_values),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
        stop_sequences=stops,
    )


def _max_positions(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def _check_shapes(model, input_ids, attention_mask, max_new_tokens: int) -> None:
    """Shape checks that need no concrete values (safe at trace time)."""
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, prompt_len], got shape {tuple(input_ids.shape)}; "
            "add a batch axis with input_ids[None]."
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}: generation needs at least one prompt of at least "
            "one token."
        )
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids."
        )
    limit = _max_positions(model)
    total = input_ids.shape[1] + max_new_tokens
    if limit is not None and total > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
            f"model's max_position_embeddings {limit}; truncate the prompt (tokenizer(..., truncation=True, "
            f"max_length={max(limit - max_new_tokens, 1)})) or lower max_new_tokens."
        )


def check_token_range(
    model, ids, name: str = "input_ids",
    fix: str = "pad prompts with the pad token id and tokenize with the model's own tokenizer.",
) -> None:
    """Host check of concrete token ids (any shape): every id (pad positions too: they are
    embedded) must be in ``[0, vocab_size)``; an id outside gives NaN embeddings (JAX fills
    out-of-range lookups) instead of an error. ``name`` and ``fix`` word the ValueError for
    the caller (generation, the trainers' batches, PPOTrainer.step)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        where = f"row {first[0]}, position {first[1]}" if len(first) == 2 else f"position {first[-1]}"
        values = sorted({int(v) for v in ids[bad]})[:5]
        hint = " (-100 is a label ignore index, not a token)" if -100 in values else ""
        raise ValueError(
            f"{name} holds ids {values} outside the model's vocabulary [0, {vocab}) (first at {where}){hint}; {fix}"
        )


def _check_left_padded(attention_mask) -> None:
    """Host check of a concrete mask: no row may have a 0 after a 1, nor be empty."""
    mask = np.asarray(attention_mask) != 0
    right_padded = np.any(mask[:, :-1] & ~mask[:, 1:], axis=1)
    if right_padded.any():
        rows = np.nonzero(right_padded)[0][:5].tolist()
        raise ValueError(
            f"attention_mask rows {rows} are right-padded (a 0 after a 1). Generation needs LEFT padding: "
            "set tokenizer.padding_side = 'left' before tokenizing the prompts."
        )
    empty = ~mask.any(axis=1)
    if empty.any():
        rows = np.nonzero(empty)[0][:5].tolist()
        raise ValueError(f"attention_mask rows {rows} have no real tokens; every prompt needs at least one token.")


# --------------------------------------------------------------------------
# The core
# --------------------------------------------------------------------------


def _ends_with_stop(tokens: Array, t, stops: Tuple[Tuple[int, ...], ...]) -> Array:
    """[B] bool: ``tokens[:, :t + 1]`` ([B, N] response so far) ends with one of ``stops``.

    One static slice-and-compare per stop sequence (a handful), no host callback."""
    hit = jnp.zeros((tokens.shape[0],), bool)
    for seq in stops:
        n = len(seq)
        if n > tokens.shape[1]:
            continue  # longer than the response: can never match
        window = jax.lax.dynamic_slice_in_dim(tokens, jnp.clip(t - n + 1, 0, tokens.shape[1] - n), n, axis=1)
        hit = hit | ((t >= n - 1) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1))
    return hit


def _init_cache(model, batch: int, length: int, dtype):
    if dtype is None:
        return model.init_cache(batch, length)
    return model.init_cache(batch, length, dtype=dtype)


def _constrain_rows(tree: Any, batch: int) -> Any:
    """``constrain_batch`` on the leaves whose leading dim is the ``batch`` rows (a cache's
    scalar index or a layer-stacked leaf is left alone); a no-op off a mesh."""
    return jax.tree_util.tree_map(
        lambda x: constrain_batch(x) if x is not None and jnp.ndim(x) and x.shape[0] == batch else x, tree
    )


def _output_values(out, required: bool) -> Optional[Array]:
    values = getattr(out, "values", None)
    if callable(values):  # a Mapping's .values method, not a value head
        values = None
    if values is None and required:
        raise ValueError(
            "return_values=True but the model's output has no .values; "
            "wrap the model with a value head (rljax.models.heads) or pass return_values=False."
        )
    return values


def _generate(
    model, settings: GenerationSettings, params, input_ids, attention_mask, rng, new_tokens_limit=None
) -> GenerationOutput:
    """Pure generation core (traced once per input shapes). See ``generate``.
    ``new_tokens_limit``: None, or a (traced) int: decode stops after that many new tokens
    (at most ``max_new_tokens``, the fixed output width); one compiled program serves every limit."""
    TRACE_COUNTS[settings] += 1
    s = settings
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    _check_shapes(model, input_ids, attention_mask, s.max_new_tokens)
    batch, prompt_len = input_ids.shape
    n_new = s.max_new_tokens
    input_ids = input_ids.astype(jnp.int32)
    attention_mask = (attention_mask != 0).astype(jnp.int32)
    eos_ids = jnp.asarray(s.eos_token_id, jnp.int32) if s.eos_token_id else None
    pad = s.pad_token_id if s.pad_token_id is not None else 0
    want_values = s.return_values

    def forward(tokens, slot_mask, position_ids, cache):
        # The heads run on the last column only (nanoGPT's lm_head(x[:, [-1]])): the prefill
        # needs each row's next-token distribution, not the prompt's [B, P, V] logits.
        out = apply_windowed(
            model,
            {"params": params},
            tokens,
            attention_mask=slot_mask,
            position_ids=position_ids,
            cache=cache,
            deterministic=True,
            logits_window=(-1, 1),
        )
        values = _output_values(out, want_values)
        last_value = values[:, -1].astype(jnp.float32) if want_values else None
        return out.logits[:, -1].astype(jnp.float32), last_value, out.cache

    def choose(t, logits, value, record):
        """Pick token t from next-token ``logits`` [B, V] and write it into ``record``."""
        tokens, response_mask, logprobs, values, finished = record
        processed = logits
        if s.eos_token_id and s.min_new_tokens > 0:
            blocked = processed.at[:, eos_ids].set(-jnp.inf)
            processed = jnp.where(t < s.min_new_tokens, blocked, processed)
        if s.do_sample:
            token = sample_logits(processed, jax.random.fold_in(rng, t), s.temperature, s.top_k, s.top_p)
        else:
            token = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        alive = ~finished
        token = jnp.where(alive, token, pad)
        tokens = tokens.at[:, t].set(token)
        response_mask = response_mask.at[:, t].set(alive.astype(jnp.int32))
        if s.return_logprobs:
            raw = jax.nn.log_softmax(logits, axis=-1)
            lp = jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0]
            logprobs = logprobs.at[:, t].set(jnp.where(alive, lp, 0.0))
        if want_values:
            values = values.at[:, t].set(jnp.where(alive, value, 0.0))
        if s.eos_token_id:
            finished = finished | jnp.isin(token, eos_ids)
        if s.stop_sequences:
            finished = finished | (alive & _ends_with_stop(tokens, t, s.stop_sequences))
        return token, (tokens, response_mask, logprobs, values, finished)

    # On a mesh (``rljax.sharding.jit_sharded``) the batch axis of the prompt, the KV cache and
    # the outputs stays split over (data, fsdp): each device decodes its own rows.
    input_ids, attention_mask = constrain_batch((input_ids, attention_mask))
    # Prefill: the whole prompt in one call, into a cache sized for the full output.
    cache = _constrain_rows(_init_cache(model, batch, prompt_len + n_new, s.cache_dtype), batch)
    slot_mask = jnp.concatenate([attention_mask, jnp.zeros((batch, n_new), jnp.int32)], axis=1)
    prompt_positions = jnp.clip(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    next_position = attention_mask.sum(axis=1)  # [B]: position of the first new token
    logits, value, cache = forward(input_ids, slot_mask, prompt_positions, cache)

    record = (
        jnp.full((batch, n_new), pad, jnp.int32),
        jnp.zeros((batch, n_new), jnp.int32),
        jnp.zeros((batch, n_new), jnp.float32) if s.return_logprobs else None,
        jnp.zeros((batch, n_new), jnp.float32) if want_values else None,
        jnp.zeros((batch,), bool),
    )
    token, record = choose(0, logits, value, record)
    token, record = constrain_batch((token, record))

    # Decode: step t feeds token t-1 (slot prompt_len + t - 1) and picks token t.
    limit = n_new if new_tokens_limit is None else jnp.clip(jnp.asarray(new_tokens_limit, jnp.int32), 1, n_new)

    def cond(carry):
        t, _, _, _, record = carry
        keep_going = t < limit
        if s.eos_token_id or s.stop_sequences:
            keep_going = keep_going & ~jnp.all(record[-1])
        return keep_going

    def body(carry):
        t, token, slot_mask, cache, record = carry
        slot = prompt_len + t - 1
        slot_mask = jax.lax.dynamic_update_slice(slot_mask, jnp.ones((batch, 1), jnp.int32), (0, slot))
        positions = (next_position + t - 1)[:, None]
        logits, value, cache = forward(token[:, None], slot_mask, positions, cache)
        token, record = choose(t, logits, value, record)
        token, slot_mask, cache, record = _constrain_rows((token, slot_mask, cache, record), batch)
        return t + 1, token, slot_mask, cache, record

    carry = (jnp.array(1, jnp.int32), token, slot_mask, cache, record)
    if n_new > 1:
        carry = jax.lax.while_loop(cond, body, carry)
    tokens, response_mask, logprobs, values, _ = carry[-1]
    return GenerationOutput(
        sequences=jnp.concatenate([input_ids, tokens], axis=1),
        response_mask=response_mask,
        logprobs=logprobs,
        values=values,
    )


_JIT_CACHE: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()
_JIT_CACHE_SIZE = 64


def _with_traced_limit(jitted: Callable, core: Callable, max_new_tokens: int) -> Callable:
    """``fn(params, ids, mask, rng, new_tokens_limit=None)`` over ``jitted``, always passing the limit
    as an int32 array (None: ``max_new_tokens``). One program serves calls with and without a limit:
    jit keys on the argument list, and a Python int (weakly typed) keys apart from an int32 array."""

    def limit_of(new_tokens_limit):
        return jnp.asarray(max_new_tokens if new_tokens_limit is None else new_tokens_limit, jnp.int32)

    def fn(params, input_ids, attention_mask, rng, new_tokens_limit=None):
        return jitted(params, input_ids, attention_mask, rng, limit_of(new_tokens_limit))

    def lower(params, input_ids, attention_mask, rng, new_tokens_limit=None):
        return jitted.lower(params, input_ids, attention_mask, rng, limit_of(new_tokens_limit))

    fn.__wrapped__ = core  # rljax.rollout.generation_temperature reads the settings there
    fn.lower = lower
    fn._cache_size = jitted._cache_size  # the number of compiled programs (tests)
    return fn


def _cached_fn(model, settings: GenerationSettings, jit: bool) -> Callable:
    core = functools.partial(_generate, model, settings)
    if not jit:
        return core
    try:
        key = (model, settings)
        hash(key)
    except TypeError:  # an unhashable module: fall back to identity (kept alive below)
        key = (id(model), settings)
    if key in _JIT_CACHE:
        _JIT_CACHE.move_to_end(key)
        return _JIT_CACHE[key][1]
    fn = _with_traced_limit(jax.jit(core), core, settings.max_new_tokens)
    _JIT_CACHE[key] = (model, fn)
    while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
        _JIT_CACHE.popitem(last=False)
    return fn


def make_generate_fn(
    model,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_id: TokenIds = None,
    pad_token_id: Optional[int] = None,
    return_logprobs: bool = False,
    return_values: bool = False,
    cache_dtype=None,
    jit: bool = True,
    stop_sequences=None,
) -> Callable[[Any, Array, Array, Array], GenerationOutput]:
    """Build ``fn(params, input_ids [B, P], attention_mask [B, P], rng, new_tokens_limit=None)
    -> GenerationOutput`` (``new_tokens_limit``: a traced int limit, see ``generate``).

    The settings (see ``generate``) are validated here and baked in as
    compile-time constants. With ``jit=True`` (default) the jitted function is
    shared by every call with an equal model and equal settings, so it
    compiles once per input shape. ``fn`` is pure and free of host callbacks:
    call it inside your own ``jax.jit`` (e.g. a PPO rollout) or pass
    ``jit=False`` to get the raw traceable function. It does not check for
    right padding (it cannot see concrete values under jit); ``generate`` does.
    """
    settings = _settings(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        return_logprobs=return_logprobs,
        return_values=return_values,
        cache_dtype=cache_dtype,
        stop_sequences=stop_sequences,
    )
    return _cached_fn(model, settings, jit)


def generate(
    model,
    params,
    input_ids,
    attention_mask,
    rng,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_id: TokenIds = None,
    pad_token_id: Optional[int] = None,
    return_logprobs: bool = False,
    return_values: bool = False,
    cache_dtype=None,
    stop_sequences=None,
    new_tokens_limit=None,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens after left-padded prompts.

    input_ids, attention_mask: [B, P] (mask None = no padding); rng: PRNG key
    (the same key gives the same output). Settings follow HF ``generate``:
    greedy when ``do_sample=False``; otherwise temperature, then top-k
    (0 = off; HF's own default is 50, TRL's PPO examples pass 0), then top-p
    (nucleus; 1.0 = off) filter the logits before sampling. ``min_new_tokens``
    masks eos to -inf for the first steps. A row
    stops at its first eos (``eos_token_id``: an int or several ids) and
    is filled with ``pad_token_id`` after it; the loop ends early once every row
    has stopped. ``return_logprobs`` adds the RAW model logprobs of the chosen
    tokens, ``return_values`` the value head's outputs (model output must have
    ``.values``). ``cache_dtype`` overrides the KV cache dtype (default: the
    model's compute dtype). ``stop_sequences`` (token-id sequences, e.g.
    :func:`stop_sequences_for` of stop strings) end a row like eos once its
    response ends with one of them: matched on ids inside the decode loop.

    ``new_tokens_limit`` (an int, e.g. a ``LengthSampler`` draw): decode at most that many
    tokens; the output keeps its ``max_new_tokens`` width (pad and mask 0 past the limit) and
    the limit is a traced argument, so varying it never recompiles.

    Returns ``GenerationOutput`` (sequences [B, P + max_new_tokens],
    response_mask, logprobs, values; see its docstring). Raises ValueError on
    bad settings or inputs, each message naming the fix.
    """
    fn = make_generate_fn(
        model,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        return_logprobs=return_logprobs,
        return_values=return_values,
        cache_dtype=cache_dtype,
        stop_sequences=stop_sequences,
    )
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    _check_shapes(model, input_ids, attention_mask, max_new_tokens)
    if not isinstance(attention_mask, jax.core.Tracer):
        _check_left_padded(attention_mask)
    if not isinstance(input_ids, jax.core.Tracer):
        check_token_range(model, input_ids)
    if new_tokens_limit is None:
        return fn(params, input_ids, attention_mask, rng)
    if not isinstance(new_tokens_limit, jax.core.Tracer) and not 1 <= int(new_tokens_limit) <= max_new_tokens:
        raise ValueError(f"new_tokens_limit={new_tokens_limit} must be between 1 and max_new_tokens={max_new_tokens}.")
    return fn(params, input_ids, attention_mask, rng, jnp.asarray(new_tokens_limit, jnp.int32))


# --------------------------------------------------------------------------
# TRL-compatible helpers
# --------------------------------------------------------------------------


def respond_to_batch(model, params, queries, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0, rng=None) -> Array:
    """TRL's ``trl.core.respond_to_batch``: sample ``txt_len`` tokens after each query.

    queries: [B, P] unpadded token ids (all rows the same length, as in TRL).
    Sampling is plain multinomial at temperature 1 after top-k / top-p
    filtering, with no eos stopping. Returns the last ``txt_len`` tokens,
    [B, txt_len]. Unlike TRL, randomness comes from ``rng`` (required) and
    ``params`` are passed explicitly.
    """
    if rng is None:
        raise ValueError("respond_to_batch needs a PRNG key: pass rng=jax.random.PRNGKey(seed).")
    queries = jnp.asarray(queries)
    out = generate(
        model,
        params,
        queries,
        None,
        rng,
        max_new_tokens=txt_len,
        do_sample=True,
        top_k=top_k,
        top_p=top_p,
    )
    return out.sequences[:, -txt_len:]


def stop_sequences_for(tokenizer, stop_strings: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
    """Token-id sequences for ``stop_strings`` (host side), for ``generate(stop_sequences=...)``.

    A string tokenizes differently in context (BPE merges it with what precedes it), so
    each string gives its ids alone and after a space; a stop string that is one added
    token (``tokenizer.add_tokens(["<call>"])``) always matches. A string met in another
    tokenization is not caught on device: cut the decoded text afterwards as TRL does
    (``rljax.environment`` does both).
    """
    seqs = []
    for text in stop_strings:
        if not text:
            raise ValueError("stop_strings holds an empty string; pass non-empty strings such as '<call>'.")
        seqs.append(tuple(tokenizer.encode(text, add_special_tokens=False)))
        spaced = tuple(tokenizer.encode(" " + text, add_special_tokens=False))
        if tokenizer.decode(list(spaced)).endswith(text):
            seqs.append(spaced)
    return _stop_tuple(seqs)


def strip_responses(
    sequences,
    prompt_len: int,
    eos_token_id: TokenIds,
    pad_token_id: Optional[int],
    remove_padding: bool = True,
) -> List[np.ndarray]:
    """Split generated sequences into per-row 1-D numpy responses (host side).

    sequences: [B, prompt_len + N] as returned by ``generate``. Each response
    is ``sequences[i, prompt_len:]``; with ``remove_padding`` it is cut right
    after its first eos (the eos is kept), like TRL's
    ``PPOTrainer._generate_batched(remove_padding=True)``. When no eos id is
    given, trailing ``pad_token_id`` tokens are stripped instead.

    TRL 0.7.11 detail: TRL searches for the first eos in the prompt + response when
    ``return_prompt=True``, so a prompt containing eos (e.g. pad == eos) cuts
    inside the prompt. We deliberately look at the RESPONSE only.
    """
    seqs = np.asarray(sequences)
    if seqs.ndim != 2:
        raise ValueError(f"sequences must be [batch, prompt_len + new_tokens], got shape {seqs.shape}.")
    eos = np.asarray(_eos_tuple(eos_token_id), dtype=seqs.dtype)
    out = []
    for row in seqs[:, prompt_len:]:
        if remove_padding:
            if eos.size:
                hits = np.nonzero(np.isin(row, eos))[0]
                if hits.size:
                    row = row[: hits[0] + 1]
            elif pad_token_id is not None:
                real = np.nonzero(row != pad_token_id)[0]
                row = row[: real[-1] + 1] if real.size else row[:0]
        out.append(np.array(row))
    return out


__all__ = [
    "GenerationOutput",
    "GenerationSettings",
    "filter_logits",
    "generate",
    "make_generate_fn",
    "respond_to_batch",
    "sample_categorical",
    "sample_logits",
    "stop_sequences_for",
    "strip_responses",
]
