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

from typing import Any, Optional

import flax
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


def attention_bias(attention_mask: jax.Array, q_len: int, offset, dtype) -> jax.Array:
    """Additive bias [batch, 1, q_len, kv_len]: causal (query i sits at slot offset+i)
    and key padding. Fully masked rows get a finite large negative, never NaN."""
    kv_len = attention_mask.shape[-1]
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def update_layer_cache(layer_cache: dict, k: jax.Array, v: jax.Array, index) -> dict:
    """Write k, v ([batch, seq, kv_heads, head_dim]) at slot ``index`` of the layer cache."""
    k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
    return {"k": k_all, "v": v_all}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    bias: [batch, 1, q_len, kv_len]. Returns [batch, q_len, heads, head_dim].
    Softmax runs in float32 whatever the parameter dtype.
    """
    b, q_len, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    q = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    scores = scores + bias[:, :, None].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, q_len, h, d)


def attend(q, k, v, attention_mask, layer_cache, cache_index):
    """Attention for one layer, with or without a cache. Returns (out, new_layer_cache)."""
    q_len = q.shape[1]
    if layer_cache is None:
        bias = attention_bias(attention_mask, q_len, 0, jnp.float32)
        return dot_product_attention(q, k, v, bias), None
    new_cache = update_layer_cache(layer_cache, k, v, cache_index)
    bias = attention_bias(attention_mask, q_len, cache_index, jnp.float32)
    return dot_product_attention(q, new_cache["k"], new_cache["v"], bias), new_cache
