"""Encoder-decoder helpers: cached generation and TRL's PPO forward for seq2seq models (T5).

``seq2seq_generate`` runs the encoder once, precomputes every decoder block's cross-attention
keys/values, then decodes inside one ``lax.while_loop`` over a preallocated self-attention
cache. Its ``sequences`` are the DECODER tokens, starting with ``decoder_start_token_id``
(what HF's ``generate`` returns for an encoder-decoder and what TRL's PPO uses as responses).

For PPO (TRL 0.7.11's ``batched_forward_pass`` with ``is_encoder_decoder``): queries go to the
encoder, responses are decoder inputs; log-probs come from ``logits[:, :-1]`` over the decoder
ids and the mask keeps positions ``1 .. len(response) - 2`` (TRL's ``start = 1``,
``end = decoder_attention_mask.sum() - 1``). ``Seq2SeqAsCausal`` presents such a model to the
causal PPO step (``rljax.ppo_train.make_ppo_step``): it takes ``[query | response]`` and puts
the decoder's outputs where the causal layout expects them (the response window), so the
whole PPO step (epochs, minibatches, stats) is shared with decoder-only models.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional, Tuple

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.core import logprobs_from_logits
from rljax.generation import GenerationSettings, _settings, sample_logits
from rljax.models.t5 import T5ForConditionalGeneration, make_decoder_cache

Array = jax.Array


def _lm_and_params(module, params):
    """(the bare encoder-decoder LM, its params) of an LM or a value-head wrapper."""
    lm = getattr(module, "lm", module)
    return lm, {k: v for k, v in params.items() if k != "v_head"}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Seq2SeqGenerationOutput:
    """``sequences`` [batch, D + max_new_tokens] int32: the decoder prefix (by default the start
    token alone, D = 1), then the new tokens (``pad_token_id`` after a row's first eos);
    ``response_mask`` of the same shape: 1 for the prefix and the generated tokens up to and
    including the first eos."""

    sequences: Array
    response_mask: Array


def _generate(lm, s: GenerationSettings, params, input_ids, attention_mask, decoder_prefix, rng):
    """decoder_prefix [B, D]: the decoder's first tokens (the start token, maybe more), fed as given."""
    batch = input_ids.shape[0]
    n_new = s.max_new_tokens
    D = decoder_prefix.shape[1]
    total = D - 1 + n_new  # decoding steps = decoder slots used
    pad = s.pad_token_id if s.pad_token_id is not None else 0
    eos_ids = jnp.asarray(s.eos_token_id, jnp.int32) if s.eos_token_id else None
    attention_mask = (attention_mask != 0).astype(jnp.int32)
    enc = lm.apply({"params": params}, input_ids.astype(jnp.int32), attention_mask,
                   method=T5ForConditionalGeneration.encode)
    cache = make_decoder_cache(lm, params, enc, batch, total, s.cache_dtype)
    forced = jnp.concatenate([decoder_prefix[:, 1:], jnp.zeros((batch, n_new), jnp.int32)], axis=1)  # [B, total]

    def body(carry):
        """Feed ``token_in`` at decoder slot t; pick token t + 1 of the decoder sequence."""
        t, token_in, slot_mask, cache, tokens, finished = carry
        slot_mask = jax.lax.dynamic_update_slice(slot_mask, jnp.ones((batch, 1), jnp.int32), (0, t))
        logits, _, cache = lm.apply({"params": params}, token_in[:, None], slot_mask, None, attention_mask, cache,
                                    method=T5ForConditionalGeneration.decode)
        logits = logits[:, -1]
        new_index = t - (D - 1)  # index among the new tokens (< 0 inside the prefix)
        if s.eos_token_id and s.min_new_tokens > 0:
            logits = jnp.where(new_index < s.min_new_tokens, logits.at[:, eos_ids].set(-jnp.inf), logits)
        if s.do_sample:
            token = sample_logits(logits, jax.random.fold_in(rng, t), s.temperature, s.top_k, s.top_p)
        else:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        in_prefix = new_index < 0
        token = jnp.where(in_prefix, forced[:, t], jnp.where(finished, pad, token))
        tokens = tokens.at[:, t].set(token)
        if s.eos_token_id:
            finished = finished | (jnp.isin(token, eos_ids) & ~in_prefix)
        return t + 1, token, slot_mask, cache, tokens, finished

    def cond(carry):
        t, *_, finished = carry
        going = t < total
        return going & ~jnp.all(finished) if s.eos_token_id else going

    carry = (jnp.array(0, jnp.int32), decoder_prefix[:, 0], jnp.zeros((batch, total), jnp.int32), cache,
             jnp.full((batch, total), pad, jnp.int32), jnp.zeros((batch,), bool))
    tokens = jax.lax.while_loop(cond, body, carry)[4]
    new = tokens[:, D - 1:]
    # Mask: generated tokens up to and including the first eos (pad after it is not a token).
    if s.eos_token_id:
        is_eos = jnp.isin(new, eos_ids)
        mask = ((jnp.cumsum(is_eos, axis=1) - is_eos) == 0).astype(jnp.int32)
    else:
        mask = jnp.ones_like(new)
    sequences = jnp.concatenate([decoder_prefix, new], axis=1)
    response_mask = jnp.concatenate([jnp.ones((batch, D), jnp.int32), mask], axis=1)
    return Seq2SeqGenerationOutput(sequences, response_mask)


_JIT: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()


def seq2seq_generate(
    module,
    params,
    input_ids: Array,
    attention_mask: Optional[Array],
    rng: Array,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    decoder_start_token_id: Optional[int] = None,
    decoder_input_ids: Optional[Array] = None,
    cache_dtype=None,
) -> Seq2SeqGenerationOutput:
    """Generate decoder outputs for encoder inputs ``input_ids`` [batch, src_len] (any padding).

    Jitted (one compiled program per settings and shapes). Greedy (``do_sample=False``)
    equals HF ``generate`` token for token. ``decoder_start_token_id`` defaults to the
    config's (T5: the pad id 0). ``decoder_input_ids`` [batch, D] (no padding): a decoder prefix
    to continue (HF's ``generate(..., decoder_input_ids=...)``); the output then starts with
    it and has D + max_new_tokens columns. Returns ``Seq2SeqGenerationOutput`` (see there).
    """
    lm, lm_params = _lm_and_params(module, params)
    if not getattr(lm, "is_encoder_decoder", False):
        raise ValueError(f"seq2seq_generate needs an encoder-decoder model, got {type(lm).__name__}; "
                         "use rljax.generation.generate for causal LMs.")
    chex.assert_rank(input_ids, 2)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    chex.assert_equal_shape([input_ids, attention_mask])
    start = decoder_start_token_id if decoder_start_token_id is not None else lm.config.decoder_start_token_id
    if start is None:
        raise ValueError("decoder_start_token_id is None in the config; pass decoder_start_token_id=... (T5: 0).")
    if eos_token_id is not None and pad_token_id is None:
        pad_token_id = lm.config.pad_token_id
    s = _settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  return_logprobs=False, return_values=False, cache_dtype=cache_dtype)
    if decoder_input_ids is None:
        decoder_input_ids = jnp.full((input_ids.shape[0], 1), start, jnp.int32)
    chex.assert_rank(decoder_input_ids, 2)
    chex.assert_equal(decoder_input_ids.shape[0], input_ids.shape[0])
    key = (lm, s)
    if key not in _JIT:
        _JIT[key] = jax.jit(functools.partial(_generate, lm, s))
        while len(_JIT) > 32:
            _JIT.popitem(last=False)
    _JIT.move_to_end(key)
    return _JIT[key](lm_params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                     jnp.asarray(decoder_input_ids, jnp.int32), rng)


# --------------------------------------------------------------------------------------------
# PPO forward (TRL's batched_forward_pass, encoder-decoder branch)
# --------------------------------------------------------------------------------------------


def trl_decoder_masks(decoder_attention_mask: Array) -> Array:
    """TRL 0.7.11's encoder-decoder loss mask [batch, N - 1] from the decoder mask [batch, N]
    (right-padded): ``masks[t] = dmask[t + 1]``, then zero at ``t < 1`` and ``t >= sum - 1``.
    So positions ``1 .. len - 2`` count: the prediction of the first token after the start
    token and anything past the response are left out, as in TRL."""
    dm = decoder_attention_mask.astype(jnp.float32)
    masks = dm[:, 1:]
    t = jnp.arange(masks.shape[1])[None, :]
    end = dm.sum(-1, keepdims=True) - 1
    return jnp.where((t >= 1) & (t < end), masks, 0.0)


def seq2seq_forward(module, params, queries: Array, query_mask: Array, responses: Array, response_mask: Array):
    """One eval-mode forward of a seq2seq value-head model in TRL's layout.

    queries/query_mask [B, P] (encoder; any padding), responses/response_mask [B, N] (decoder
    ids starting with the start token, right-padded). Returns ``(logprobs, logits, values,
    masks)``: [B, N-1], [B, N-1, V], [B, N-1], [B, N-1] (TRL's ``batched_forward_pass``)."""
    chex.assert_equal_shape([queries, query_mask])
    chex.assert_equal_shape([responses, response_mask])
    out = module.apply({"params": params}, queries, query_mask, responses, response_mask, deterministic=True)
    logits = out.logits[:, :-1]
    values = getattr(out, "values", None)
    values = None if values is None else values[:, :-1].astype(jnp.float32)
    return logprobs_from_logits(logits, responses[:, 1:]), logits, values, trl_decoder_masks(response_mask)


@flax.struct.dataclass
class _CausalView:
    logits: Array
    values: Array
    hidden_states: Array
    cache: Any = None


class Seq2SeqAsCausal(nn.Module):
    """A seq2seq value-head model seen as a causal one over ``[query (P) | decoder ids (N)]``.

    ``__call__(input_ids [B, P+N], attention_mask [B, P+N], position_ids=None, cache=None,
    deterministic=True)``: the first ``query_length`` columns go to the encoder, the rest to
    the decoder. The output's ``logits`` [B, P+N, V] / ``values`` [B, P+N] hold the decoder's
    outputs at columns ``P .. P+N-1`` (column ``P + k`` predicts decoder token ``k + 1``, i.e.
    ``input_ids[:, P + k + 1]``, as a causal LM's column predicts the next column) and zeros in
    the query columns, which every PPO mask leaves out. Params: exactly the wrapped model's.
    """

    model: nn.Module
    query_length: int

    def setup(self):
        nn.share_scope(self, self.model)

    @property
    def config(self):
        return self.model.config

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic: bool = True):
        P = self.query_length
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        out = self.model(input_ids[:, :P], attention_mask[:, :P], input_ids[:, P:], attention_mask[:, P:],
                         deterministic=deterministic)
        B = input_ids.shape[0]
        logits = jnp.concatenate([jnp.zeros((B, P, out.logits.shape[-1]), out.logits.dtype), out.logits], axis=1)
        values = jnp.concatenate([jnp.zeros((B, P), out.values.dtype), out.values], axis=1)
        hidden = jnp.concatenate([jnp.zeros((B, P, out.hidden_states.shape[-1]), out.hidden_states.dtype),
                                  out.hidden_states], axis=1)
        return _CausalView(logits, values, hidden)


def response_aligned_masks(response_mask: Array, extra_mask: Optional[Array] = None) -> Array:
    """TRL's encoder-decoder masks aligned with the decoder tokens, [B, N] (the layout of
    ``rljax.rollout.Rollout``): token j counts iff TRL's position j - 1 does, i.e.
    ``2 <= j <= len - 1``. ``extra_mask`` [B, N] (PPO's ``response_masks``) multiplies token j
    by ``extra_mask[j - 1]``: TRL multiplies its position t by ``response_masks[t]``, unshifted."""
    masks = trl_decoder_masks(response_mask)
    if extra_mask is not None:
        masks = masks * extra_mask[:, : masks.shape[1]].astype(jnp.float32)
    return jnp.concatenate([jnp.zeros((masks.shape[0], 1), jnp.float32), masks], axis=1)


def make_seq2seq_forward_rollout(module, query_length: int, kl_penalty_mode: str = "kl",
                                 chunk_size: Optional[int] = None) -> Tuple[nn.Module, Callable]:
    """``(causal_view, forward)`` for PPO on an encoder-decoder value-head ``module``.

    ``causal_view = Seq2SeqAsCausal(module, query_length)`` is what ``make_ppo_step`` gets (its
    response window, columns ``P-1 .. P+N-2``, holds the decoder's predictions of decoder tokens
    ``0 .. N-1``); ``forward(params, ref_params, queries [B, P], query_mask, responses [B, N],
    response_mask)`` returns a ``rljax.rollout.Rollout`` ([B, N] arrays) with TRL's
    encoder-decoder masks (``response_aligned_masks``). Not jitted itself."""
    from rljax.rollout import make_forward_rollout

    view = Seq2SeqAsCausal(module, query_length)
    causal = make_forward_rollout(view, kl_penalty_mode, chunk_size=chunk_size)

    def forward(params, ref_params, queries, query_mask, responses, response_mask):
        chex.assert_shape(queries, (None, query_length))
        rollout = causal(params, ref_params, queries, query_mask, responses, response_mask)
        return rollout.replace(masks=response_aligned_masks(response_mask))

    return view, forward


__all__ = [
    "Seq2SeqGenerationOutput",
    "seq2seq_generate",
    "seq2seq_forward",
    "trl_decoder_masks",
    "Seq2SeqAsCausal",
    "response_aligned_masks",
    "make_seq2seq_forward_rollout",
]
