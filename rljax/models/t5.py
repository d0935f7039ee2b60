"""T5 (v1.0, and v1.1 / flan-t5 by config flags) as a Flax encoder-decoder whose parameter
names map one-to-one onto HF's ``T5ForConditionalGeneration``.

HF name                                                      flax path
shared.weight                                                shared/embedding
encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight     encoder/block_{i}/layer_0/SelfAttention/q/kernel
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (first block of each stack only)
encoder.block.{i}.layer.0.layer_norm.weight                  encoder/block_{i}/layer_0/layer_norm/weight
encoder.block.{i}.layer.1.DenseReluDense.{wi,wo | wi_0,wi_1,wo}.weight
decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight   (cross-attention; FF is layer.2)
{encoder,decoder}.final_layer_norm.weight
lm_head.weight                                               lm_head/kernel, only when untied (v1.1)

Flags: ``feed_forward_proj`` "relu" (v1.0) or "gated-gelu" (v1.1: ``wi_0``/``wi_1``, gelu_new);
``tie_word_embeddings`` true (v1.0: the head reuses ``shared``, decoder output scaled by
``d_model ** -0.5``) or false (v1.1: a separate ``lm_head``, no scaling). Attention scores are
not scaled; the relative position bias of each stack's first block is added in every block.

Decoder cache (explicit pytree, preallocated; cross-attention keys/values computed once from
the encoder output)::

    {"self": [{"k", "v": [batch, max_len, heads, d_kv]}, ...],     # one per decoder block
     "cross": [{"k", "v": [batch, enc_len, heads, d_kv]}, ...],
     "index": int32 scalar}                                          # next free decoder slot

With a cache, ``decoder_attention_mask`` is ``[batch, max_len]`` over the decoder slots.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.models.attention import attention_bias, dot_product_attention, update_layer_cache
from rljax.models.llama import RMSNorm

ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Fields named as in HF's T5 ``config.json``."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    pad_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = 0
    tie_word_embeddings: bool = True
    # transformers 5 writes this beside tie_word_embeddings; None: scale iff the head is tied.
    scale_decoder_outputs: Optional[bool] = None
    model_type: str = "t5"

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use 'relu', 'gated-gelu' or "
                f"'[gated-]ACT' with ACT in {sorted(ACTIVATIONS)}."
            )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    # Family-neutral names used by generation, heads and trainers.
    is_encoder_decoder = True

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def initializer_range(self) -> float:
        return self.initializer_factor

    max_position_embeddings = None  # relative positions: no hard limit

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("eos_token_id"), (list, tuple)):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("tie_word_embeddings", True) and kw.get("scale_decoder_outputs") is False:
            # transformers 5 loads a v1.1 checkpoint (tie_word_embeddings: false) as "tied, unscaled"
            # and keeps its own lm_head.weight; such a config saved again means an untied head.
            kw["tie_word_embeddings"] = False
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("scale_decoder_outputs")
        if self.scale_decoder_outputs != self.tie_word_embeddings:
            raise ValueError("T5 with scale_decoder_outputs != tie_word_embeddings cannot be written as an HF config.")
        d.update(architectures=[ARCHITECTURES.get(self.model_type, "T5ForConditionalGeneration")], is_encoder_decoder=True,
                 dense_act_fn=self.dense_act_fn, is_gated_act=self.is_gated_act)
        return d


# --------------------------------------------------------------------------------------------
# Relative position bias
# --------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket of ``key_position - query_position``: exact buckets for small distances,
    log-spaced ones up to ``max_distance``; bidirectional stacks split the buckets by sign."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    safe = jnp.maximum(relative_position, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


def mask_bias(mask: jax.Array, q_len: int) -> jax.Array:
    """Key-padding mask [batch, kv] -> additive bias [batch, 1, q_len, kv] (finite, never NaN)."""
    allowed = jnp.broadcast_to((mask > 0)[:, None, None, :], (mask.shape[0], 1, q_len, mask.shape[-1]))
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; the first block of a stack also owns the
    relative position bias table (``relative_attention_bias``, [num_buckets, heads])."""

    config: T5Config
    has_relative_bias: bool = False
    bidirectional: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        dense = lambda n: nn.Dense(n, use_bias=False, dtype=self.dtype)  # noqa: E731
        self.q, self.k, self.v, self.o = dense(inner), dense(inner), dense(inner), dense(cfg.d_model)
        if self.has_relative_bias:
            self.relative_attention_bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                    dtype=jnp.float32)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.config.num_heads, self.config.d_kv)

    def kv(self, x: jax.Array) -> dict:
        """Keys and values of ``x`` [batch, len, d_model] -> {"k", "v": [batch, len, heads, d_kv]}."""
        return {"k": self._heads(self.k(x)), "v": self._heads(self.v(x))}

    def compute_bias(self, q_len: int, k_len: int, offset=0) -> jax.Array:
        """Relative position bias [1, heads, q_len, k_len] for queries at ``offset + arange(q_len)``."""
        cfg = self.config
        q_pos = offset + jnp.arange(q_len)[:, None]
        rel = jnp.arange(k_len)[None, :] - q_pos
        buckets = relative_position_bucket(rel, self.bidirectional, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, x, kv: dict, bias: jax.Array, deterministic: bool = True):
        """x [batch, q, d_model]; kv {"k","v"} [batch, kv_len, heads, d_kv]; bias [batch|1, heads|1, q, kv_len]."""
        cfg = self.config
        rng = None if deterministic or not cfg.dropout_rate else self.make_rng("dropout")
        b, q_len, _ = x.shape
        bias = jnp.broadcast_to(bias, (b, cfg.num_heads, q_len, kv["k"].shape[1]))
        out = dot_product_attention(self._heads(self.q(x)), kv["k"], kv["v"], bias, cfg.dropout_rate, rng, scale=1.0)
        return self.o(out.reshape(b, q_len, -1))


class T5SelfAttentionLayer(nn.Module):
    config: T5Config
    has_relative_bias: bool = False
    bidirectional: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.SelfAttention = T5Attention(self.config, self.has_relative_bias, self.bidirectional, self.dtype)
        self.layer_norm = RMSNorm(self.config.layer_norm_epsilon, self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x, bias, layer_cache, cache_index, deterministic: bool = True):
        h = self.layer_norm(x)
        kv = self.SelfAttention.kv(h)
        if layer_cache is not None:
            kv = update_layer_cache(layer_cache, kv["k"], kv["v"], cache_index)
        out = self.SelfAttention(h, kv, bias, deterministic)
        return x + self.dropout(out, deterministic=deterministic), (None if layer_cache is None else kv)


class T5CrossAttentionLayer(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32

    def setup(self):
        self.EncDecAttention = T5Attention(self.config, False, True, self.dtype)
        self.layer_norm = RMSNorm(self.config.layer_norm_epsilon, self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x, cross_kv, bias, deterministic: bool = True):
        out = self.EncDecAttention(self.layer_norm(x), cross_kv, bias, deterministic)
        return x + self.dropout(out, deterministic=deterministic)


class T5FeedForward(nn.Module):
    """HF ``DenseReluDense``: ``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)``."""

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, "wi")(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, "wo")(h)


class T5FeedForwardLayer(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32

    def setup(self):
        self.DenseReluDense = T5FeedForward(self.config, self.dtype)
        self.layer_norm = RMSNorm(self.config.layer_norm_epsilon, self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x, deterministic: bool = True):
        out = self.DenseReluDense(self.layer_norm(x), deterministic)
        return x + self.dropout(out, deterministic=deterministic)


class T5Block(nn.Module):
    """``layer_0`` self-attention, (decoder: ``layer_1`` cross-attention), then feed-forward."""

    config: T5Config
    is_decoder: bool = False
    has_relative_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        layers = [T5SelfAttentionLayer(cfg, self.has_relative_bias, not self.is_decoder, self.dtype)]
        if self.is_decoder:
            layers.append(T5CrossAttentionLayer(cfg, self.dtype))
        layers.append(T5FeedForwardLayer(cfg, self.dtype))
        self.layer = layers

    def cross_kv(self, encoder_hidden: jax.Array) -> dict:
        return self.layer[1].EncDecAttention.kv(encoder_hidden)

    def position_bias(self, q_len: int, k_len: int, offset=0) -> jax.Array:
        return self.layer[0].SelfAttention.compute_bias(q_len, k_len, offset)

    def __call__(self, x, self_bias, layer_cache=None, cache_index=None, cross_kv=None, cross_bias=None,
                 deterministic: bool = True):
        x, new_cache = self.layer[0](x, self_bias, layer_cache, cache_index, deterministic)
        if self.is_decoder:
            x = self.layer[1](x, cross_kv, cross_bias, deterministic)
        return self.layer[-1](x, deterministic), new_cache


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal + cross-attention) stack, over embeddings."""

    config: T5Config
    is_decoder: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        self.block = [T5Block(cfg, self.is_decoder, i == 0, self.dtype) for i in range(n)]
        self.final_layer_norm = RMSNorm(cfg.layer_norm_epsilon, self.dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def cross_kv(self, encoder_hidden: jax.Array) -> list:
        return [blk.cross_kv(encoder_hidden) for blk in self.block]

    def __call__(self, x, attention_mask, cache=None, cross_kv=None, encoder_mask=None, deterministic: bool = True):
        """Encoder: x [B, S, d], attention_mask [B, S]. Decoder: x [B, T, d]; attention_mask [B, T]
        (or [B, max_len] over the cache slots with ``cache``); ``cross_kv`` per block; encoder_mask [B, S]."""
        q_len = x.shape[1]
        x = self.dropout(x, deterministic=deterministic)
        if self.is_decoder:
            index = 0 if cache is None else cache["index"]
            k_len = attention_mask.shape[-1]
            bias = self.block[0].position_bias(q_len, k_len, index) + attention_bias(
                attention_mask, q_len, index, jnp.float32)
            cross_bias = mask_bias(encoder_mask, q_len)
        else:
            index = None
            bias = self.block[0].position_bias(q_len, q_len) + mask_bias(attention_mask, q_len)
            cross_bias = None
        new_self = []
        for i, blk in enumerate(self.block):
            layer_cache = None if cache is None else cache["self"][i]
            ckv = None if cross_kv is None else cross_kv[i]
            x, lc = blk(x, bias, layer_cache, index, ckv, cross_bias, deterministic)
            new_self.append(lc)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
        new_cache = None if cache is None else {"self": new_self, "cross": cache["cross"], "index": index + q_len}
        return x, new_cache


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Seq2SeqLMOutput:
    """``logits`` [batch, dec_len, vocab] float32; ``hidden_states``: the decoder's last hidden
    state (after its final norm) [batch, dec_len, d_model]; ``encoder_hidden_states``
    [batch, enc_len, d_model]; ``cache``: the updated decoder cache or None."""

    logits: jax.Array
    hidden_states: jax.Array
    encoder_hidden_states: Optional[jax.Array] = None
    cache: Optional[Any] = None


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """HF's ``_shift_right``: decoder inputs from labels [batch, len] (start token first, -100 -> pad)."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder LM.

    ``__call__(input_ids [B, S], attention_mask=None, decoder_input_ids [B, T], decoder_attention_mask=None,
    encoder_hidden_states=None, cache=None, deterministic=True) -> Seq2SeqLMOutput``.
    ``encoder_hidden_states`` given: the encoder is skipped (``input_ids`` may then be None, the
    mask is still needed). ``encode`` / ``decode`` / ``init_cache`` are the pieces generation uses.
    """

    config: T5Config
    dtype: Any = jnp.float32
    is_encoder_decoder = True

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               embedding_init=nn.initializers.normal(cfg.initializer_factor))
        self.encoder = T5Stack(cfg, False, self.dtype)
        self.decoder = T5Stack(cfg, True, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def encode(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
        """input_ids [B, S] -> encoder hidden states [B, S, d_model]."""
        _check_ids(input_ids, "input_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x, _ = self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)
        return x

    def cross_kv(self, encoder_hidden_states: jax.Array) -> list:
        """Per decoder block, the cross-attention keys/values of the encoder output (computed once)."""
        return self.decoder.cross_kv(encoder_hidden_states)

    def decode(self, decoder_input_ids, decoder_attention_mask, encoder_hidden_states, attention_mask,
               cache=None, deterministic: bool = True):
        """Decoder + LM head -> (logits [B, T, V] float32, hidden [B, T, d_model], new cache)."""
        _check_ids(decoder_input_ids, "decoder_input_ids")
        if decoder_attention_mask is None:
            shape = decoder_input_ids.shape if cache is None else cache["self"][0]["k"].shape[:2]
            decoder_attention_mask = jnp.ones(shape, jnp.int32)
        cross = cache["cross"] if cache is not None else self.cross_kv(encoder_hidden_states)
        hidden, new_cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, cache, cross,
                                         attention_mask, deterministic)
        return self._logits(hidden), hidden, new_cache

    def _logits(self, hidden):
        cfg = self.config
        h = hidden * (cfg.d_model ** -0.5) if cfg.scale_decoder_outputs else hidden
        logits = self.shared.attend(h) if cfg.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_hidden_states=None, cache=None, deterministic: bool = True) -> Seq2SeqLMOutput:
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (the encoder input) or encoder_hidden_states.")
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            encoder_hidden_states = self.encode(input_ids, attention_mask, deterministic)
        elif attention_mask is None:
            attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        if decoder_input_ids is None:
            raise ValueError(
                "decoder_input_ids is required: start each row with config.decoder_start_token_id "
                "(shift_right(labels, ...) builds them from labels)."
            )
        logits, hidden, new_cache = self.decode(decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                                                attention_mask, cache, deterministic)
        return Seq2SeqLMOutput(logits, hidden, encoder_hidden_states, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty decoder self-attention cache (``"cross"`` is filled by ``make_decoder_cache``)."""
        cfg = self.config
        shape = (batch_size, max_length, cfg.num_heads, cfg.d_kv)
        dt = dtype or self.dtype
        layers = [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.num_decoder_layers)]
        return {"self": layers, "cross": None, "index": jnp.array(0, jnp.int32)}


def _check_ids(ids, name: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must be [batch, seq], got shape {ids.shape}; add a batch axis with x[None].")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}.")


def make_decoder_cache(module, params, encoder_hidden_states: jax.Array, batch_size: int, max_length: int,
                       dtype=None) -> dict:
    """A decoder cache with ``max_length`` self-attention slots and the cross-attention keys/values
    of ``encoder_hidden_states`` [B, S, d_model] precomputed (call inside jit)."""
    lm = getattr(module, "lm", module)
    cache = lm.init_cache(batch_size, max_length, dtype)
    cross = lm.apply({"params": _lm_only(params)}, encoder_hidden_states, method=T5ForConditionalGeneration.cross_kv)
    if dtype is not None:
        cross = jax.tree.map(lambda x: x.astype(dtype), cross)
    cache["cross"] = cross
    return cache


def _lm_only(params):
    return {k: v for k, v in params.items() if k != "v_head"}


def _register() -> None:
    from rljax.models.hub import Family, register_family

    for model_type, prefix in (("t5", "T5"), ("mt5", "MT5")):  # mT5: T5 v1.1's architecture, another vocabulary
        register_family(
            model_type,
            Family(
                T5Config,
                T5ForConditionalGeneration,
                linear_is_transposed=True,
                ignore_keys=(r"^(encoder|decoder)\.embed_tokens\.weight$",
                             r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"),
                hf_prefix=prefix,
                embed_key="shared.weight",
            ),
        )


_register()

__all__ = ["T5Config", "T5ForConditionalGeneration", "Seq2SeqLMOutput", "make_decoder_cache", "shift_right",
           "relative_position_bucket"]
