"""BLOOM as a Flax linen module whose parameter names map one-to-one onto HF's.

HF name                                                flax path
transformer.word_embeddings.weight                     transformer/word_embeddings/embedding
transformer.word_embeddings_layernorm.weight           transformer/word_embeddings_layernorm/scale
transformer.h.{i}.self_attention.query_key_value.weight transformer/h_{i}/self_attention/query_key_value/kernel
transformer.h.{i}.self_attention.dense.weight          transformer/h_{i}/self_attention/dense/kernel
transformer.h.{i}.mlp.dense_h_to_4h.weight             transformer/h_{i}/mlp/dense_h_to_4h/kernel
transformer.ln_f.weight                                transformer/ln_f/scale
lm_head.weight                                         tied to word_embeddings (no separate parameter)

Weights are ``nn.Linear`` ([out, in]; transposed on load/save); every linear has a bias.
No position embeddings: ALiBi adds ``slope[h] * position(key)`` to head h's scores, where a key's
position counts the real tokens before it in its row (``(cumsum(mask) - 1) * mask`` over all key
slots, as HF builds it), so ``position_ids`` are not read. ``query_key_value`` packs q, k, v per
head ([heads, 3, head_dim]). The embeddings pass through a LayerNorm first;
``apply_residual_connection_post_layernorm`` takes the residual after the norms.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Fields named as in HF's BLOOM ``config.json`` (older checkpoints' ``n_embed`` is read as ``hidden_size``)."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1  # only changes how HF slices its matmuls ("slow_but_exact"); same math
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None
    model_type: str = "bloom"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of n_head ({self.n_head}).")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # Family-neutral names used by generation, heads and sharding.
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.hidden_size // self.n_head)
    max_position_embeddings = None  # ALiBi: no position table, no length limit

    @classmethod
    def from_dict(cls, d: dict) -> "BloomConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if d.get("n_embed") is not None:  # the name in BLOOM's original config.json files
            kw["hidden_size"] = d["n_embed"]
        for alias, name in (("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head")):
            if alias in d and name not in d:
                kw[name] = d[alias]
        return cls(**kw)

    def to_dict(self) -> dict:
        d = drop_layer_options(dataclasses.asdict(self))
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["architectures"] = ["BloomForCausalLM"]
        return d


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [heads] (float32): a geometric series over the largest power of two
    <= heads, then every other slope of the next power's series for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = np.power(base, np.arange(1, 1 + closest, dtype=np.float32))
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        extra = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, np.power(extra_base, np.arange(1, 1 + 2 * extra, 2, dtype=np.float32))])
    return slopes.astype(np.float32)


def alibi_bias(attention_mask: jax.Array, num_heads: int) -> jax.Array:
    """[batch, heads, kv_len] float32: slope[h] * (number of real tokens before key k in its row)."""
    positions = ((jnp.cumsum(attention_mask, axis=-1) - 1) * attention_mask).astype(jnp.float32)
    return jnp.asarray(alibi_slopes(num_heads))[None, :, None] * positions[:, None, :]


def bloom_gelu(x):
    """BLOOM's tanh-approximated GELU, with its constants."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, alibi, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        qkv = nn.Dense(3 * cfg.hidden_size, dtype=self.dtype, name="query_key_value")(x)
        qkv = qkv.reshape(b, s, cfg.n_head, 3, cfg.head_dim)  # per head: [q, k, v]
        dropout_rng = None if deterministic or not cfg.attention_dropout else self.make_rng("dropout")
        out, new_cache = attend(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], attention_mask, layer_cache,
                                cache_index, dropout_rate=cfg.attention_dropout, dropout_rng=dropout_rng,
                                head_bias=alibi)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="dense")(out.reshape(b, s, cfg.hidden_size)), new_cache


class BloomMLP(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = bloom_gelu(nn.Dense(4 * self.config.hidden_size, dtype=self.dtype, name="dense_h_to_4h")(x))
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense_4h_to_h")(h)


class BloomBlock(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, alibi, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name=name)  # noqa: E731
        drop = lambda t: nn.Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)  # noqa: E731
        post_ln = cfg.apply_residual_connection_post_layernorm
        h = ln("input_layernorm")(x)
        attn, new_cache = BloomAttention(cfg, self.dtype, name="self_attention")(
            h, alibi, attention_mask, layer_cache, cache_index, deterministic
        )
        x = (h if post_ln else x) + drop(attn)
        h = ln("post_attention_layernorm")(x)
        return (h if post_ln else x) + drop(BloomMLP(cfg, self.dtype, name="mlp")(h)), new_cache


class BloomModel(nn.Module):
    """The trunk (HF ``transformer.*``). Returns (hidden after ln_f, new cache, embedding)."""

    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        del position_ids  # ALiBi reads positions from the mask (module docstring)
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="word_embeddings")
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="word_embeddings_layernorm")(
            embed(input_ids))
        alibi = alibi_bias(attention_mask, cfg.n_head).astype(self.dtype)  # HF casts it to the activations' dtype
        x, new_cache = run_layers(BloomBlock, cfg, self.dtype, "h", x, (alibi, attention_mask), cache, deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return x, new_cache, embed


class BloomForCausalLM(CausalLM):
    """BLOOM causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: BloomConfig
    trunk_cls = BloomModel
    trunk_name = "transformer"


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "bloom",
        Family(
            BloomConfig,
            BloomForCausalLM,
            linear_is_transposed=True,
            add_prefix="transformer.",
            trunk_cls=BloomModel,
            trunk_name="transformer",
            hf_prefix="Bloom",
            embed_key="transformer.word_embeddings.weight",
        ),
    )


_register()
