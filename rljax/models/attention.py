"""Pieces shared by every causal LM family: outputs, the KV cache, masked attention.

The cache is an explicit pytree passed in and returned (no flax mutable
collections), so generation is a pure function of (params, cache, tokens).

Cache layout (one entry per layer)::

    {"layers": [{"k": [batch, max_len, kv_heads, head_dim],
                 "v": [batch, max_len, kv_heads, head_dim]}, ...],
     "index": int32 scalar}   # next free slot, the same for every row

With a cache, the model's ``attention_mask`` is ``[batch, max_len]`` over the
cache slots (1 = slot holds a real token); a query written at slot ``s`` sees
slots ``<= s`` whose mask is 1. Without a cache it is ``[batch, seq]``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = dict


@flax.struct.dataclass
class CausalLMOutput:
    """Model output. ``logits``: [batch, seq, vocab]; ``hidden_states``: the last
    layer's (after the final norm), [batch, seq, hidden]; ``cache``: updated KV cache or None."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: Optional[Any] = None


def init_cache(
    num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> Cache:
    """Allocate an empty KV cache (see module docstring for the layout)."""
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]
    return {"layers": layers, "index": jnp.array(0, jnp.int32)}


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """``cumsum(mask) - 1`` clipped at 0: left-padded rows start at position 0. [batch, seq]."""
    return jnp.clip(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def attention_bias(
    attention_mask: jax.Array, q_len: int, offset, dtype, sliding_window: Optional[int] = None
) -> jax.Array:
    """Additive bias [batch, 1, q_len, kv_len]: causal (query i sits at slot offset+i)
    and key padding. Fully masked rows get a finite large negative, never NaN.

    ``sliding_window`` (Mistral/Qwen2): a query at slot q also needs ``q - k < sliding_window``.
    Slots are contiguous per row (padding only on the left), so slot distance is token distance.
    """
    kv_len = attention_mask.shape[-1]
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    causal = k_pos <= q_pos
    if sliding_window is not None:
        causal = causal & (q_pos - k_pos < sliding_window)
    allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def update_layer_cache(layer_cache: dict, k: jax.Array, v: jax.Array, index) -> dict:
    """Write k, v ([batch, seq, kv_heads, head_dim]) at slot ``index`` of the layer cache."""
    k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
    return {"k": k_all, "v": v_all}


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    head_bias: Optional[jax.Array] = None,
) -> jax.Array:
    """Softmax attention with grouped KV heads (query head i reads KV head i // (heads // kv_heads),
    as HF's ``repeat_kv`` does).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    bias: [batch, 1, q_len, kv_len]. Returns [batch, q_len, heads, head_dim].
    Softmax runs in float32 whatever the parameter dtype. With a ``dropout_rng`` (training) and
    ``dropout_rate`` > 0, the attention probabilities are dropped and rescaled by
    1 / (1 - rate), as HF's ``attn_dropout`` does; without one, nothing is dropped.
    ``scale``: the factor on q.k (None: 1 / sqrt(head_dim); GPT-Neo uses 1.0).
    ``head_bias``: [batch, heads, kv_len] added to every query's scores (Bloom's ALiBi), or None.
    """
    b, q_len, h, d = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise ValueError(f"{h} query heads cannot be grouped over {kv_heads} key/value heads.")
    groups = h // kv_heads
    q = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(d).astype(jnp.float32) if scale is None else scores * jnp.float32(scale)
    if head_bias is not None:
        scores = scores + head_bias.astype(jnp.float32).reshape(b, kv_heads, groups, 1, -1)
    scores = scores + bias[:, :, None].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, q_len, h, d)


def attend(
    q, k, v, attention_mask, layer_cache, cache_index, sliding_window: Optional[int] = None,
    dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None, scale: Optional[float] = None,
    head_bias: Optional[jax.Array] = None,
):
    """Attention for one layer, with or without a cache. Returns (out, new_layer_cache).
    ``dropout_rate``/``dropout_rng``/``scale``/``head_bias``: see ``dot_product_attention``."""
    q_len = q.shape[1]
    if layer_cache is None:
        bias = attention_bias(attention_mask, q_len, 0, jnp.float32, sliding_window)
        return dot_product_attention(q, k, v, bias, dropout_rate, dropout_rng, scale, head_bias), None
    new_cache = update_layer_cache(layer_cache, k, v, cache_index)
    bias = attention_bias(attention_mask, q_len, cache_index, jnp.float32, sliding_window)
    out = dot_product_attention(q, new_cache["k"], new_cache["v"], bias, dropout_rate, dropout_rng, scale, head_bias)
    return out, new_cache


def cache_mask_shape(cache) -> tuple:
    """(batch, max_length) of a KV cache."""
    return tuple(cache["layers"][0]["k"].shape[:2])


def check_inputs(input_ids, attention_mask, position_ids, cache) -> None:
    """Shape/dtype checks shared by every family (run at trace time)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}; add a batch axis with x[None].")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is not None:
        expected = input_ids.shape if cache is None else cache_mask_shape(cache)
        if tuple(attention_mask.shape) != tuple(expected):
            what = "[batch, seq] like input_ids" if cache is None else "[batch, cache_length] over the cache slots"
            raise ValueError(f"attention_mask must be {what} = {tuple(expected)}, got {tuple(attention_mask.shape)}.")
    if position_ids is not None and tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"position_ids must match input_ids {input_ids.shape}, got {position_ids.shape}.")


def prepare_inputs(input_ids, attention_mask, position_ids, cache):
    """Check inputs and fill defaults: an all-ones mask, and ``cumsum(mask) - 1`` positions
    (sliced at the cache index when decoding). Returns (attention_mask, position_ids)."""
    check_inputs(input_ids, attention_mask, position_ids, cache)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape if cache is None else cache_mask_shape(cache), jnp.int32)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
        if cache is not None:
            position_ids = jax.lax.dynamic_slice_in_dim(position_ids, cache["index"], input_ids.shape[1], 1)
    return attention_mask, position_ids


class CausalLM(nn.Module):
    """What every family's causal LM shares: checked inputs with default mask/positions, the
    trunk (``trunk_cls`` named ``trunk_name``, returning ``(hidden, cache, embedding)``), then a
    tied or untied ``lm_head``. ``__call__(input_ids [batch, seq], attention_mask=None,
    position_ids=None, cache=None, deterministic=True) -> CausalLMOutput``."""

    config: Any
    dtype: Any = jnp.float32
    trunk_cls: ClassVar[Any] = None
    trunk_name: ClassVar[str] = ""
    # Learned position embeddings (GPT-2) cannot go past max_position_embeddings; RoPE can.
    positions_are_hard_limit: ClassVar[bool] = False
    # An untied output projection with a bias (GPT-J, CodeGen).
    lm_head_bias: ClassVar[bool] = False
    # The untied output projection's HF name ("embed_out" in GPT-NeoX checkpoints).
    lm_head_name: ClassVar[str] = "lm_head"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        cache: Optional[dict] = None,
        deterministic: bool = True,
    ) -> CausalLMOutput:
        attention_mask, position_ids = prepare_inputs(input_ids, attention_mask, position_ids, cache)
        hidden, new_cache, embed = self.trunk_cls(self.config, self.dtype, name=self.trunk_name)(
            input_ids, attention_mask, position_ids, cache, deterministic
        )
        if self.config.tie_word_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = nn.Dense(self.config.vocab_size, use_bias=self.lm_head_bias, dtype=self.dtype,
                              name=self.lm_head_name)(hidden)
        return CausalLMOutput(logits=logits.astype(jnp.float32), hidden_states=hidden, cache=new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache for ``batch_size`` rows and ``max_length`` slots."""
        cfg = self.config
        if self.positions_are_hard_limit and max_length > cfg.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's {cfg.max_position_embeddings} positions; "
                "shorten the prompt or max_new_tokens."
            )
        return init_cache(
            cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype or self.dtype
        )
