"""GPT-NeoX (Pythia, GPT-NeoX-20B) as a Flax linen module whose parameter names map one-to-one onto HF's.

HF name                                            flax path
gpt_neox.embed_in.weight                           gpt_neox/embed_in/embedding
gpt_neox.layers.{i}.attention.query_key_value.weight gpt_neox/layers_{i}/attention/query_key_value/kernel
gpt_neox.layers.{i}.attention.dense.weight         gpt_neox/layers_{i}/attention/dense/kernel
gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight       gpt_neox/layers_{i}/mlp/dense_h_to_4h/kernel
gpt_neox.layers.{i}.input_layernorm.weight         gpt_neox/layers_{i}/input_layernorm/scale
gpt_neox.final_layer_norm.weight                   gpt_neox/final_layer_norm/scale
embed_out.weight                                   embed_out/kernel (absent when tie_word_embeddings)

Weights are ``nn.Linear`` ([out, in]; transposed on load/save). ``query_key_value`` packs q, k, v
per head: its output is [heads, 3 * head_dim] with each head's [q | k | v] side by side.
Rotary embeddings (rotate-half layout) cover the first ``rotary_ndims = head_dim * rotary_pct``
dims of each head; the rest pass through. ``use_parallel_residual``: x + attn(ln1(x)) + mlp(ln2(x))
(Pythia) or the sequential x' = x + attn(ln1(x)); x' + mlp(ln2(x')).
transformers 5 renames ``embed_out`` to ``lm_head`` in memory but reads and writes ``embed_out``
in checkpoints; rljax keeps the checkpoint name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS
from rljax.models.llama import apply_rope


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    """Fields named as in HF's GPT-NeoX ``config.json`` (transformers 4.x names; 5.x's
    ``rope_parameters`` is read too)."""

    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    model_type: str = "gpt_neox"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unknown hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}.")
        if not 0.0 <= self.rotary_pct <= 1.0 or self.rotary_ndims % 2:
            raise ValueError(
                f"rotary_pct {self.rotary_pct} gives {self.rotary_ndims} rotary dims of head_dim {self.head_dim}; "
                "it must be in [0, 1] and give an even number of dims (transformers fails on odd ones too)."
            )

    # Family-neutral names used by generation, heads and sharding.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTNeoXConfig":
        """From an HF config dict: legacy ``rotary_pct``/``rotary_emb_base`` or 5.x ``rope_parameters``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"GPT-NeoX rope scaling {rope_type!r} is not supported by rljax; only the default rotary "
                "embedding (no rope_scaling in config.json) is."
            )
        if "rope_theta" in rope:
            kw["rotary_emb_base"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            kw["rotary_pct"] = rope["partial_rotary_factor"]
        return cls(**kw)

    def to_dict(self) -> dict:
        """HF ``config.json`` contents (legacy rotary fields, read by transformers 4.x and 5.x)."""
        d = drop_layer_options(dataclasses.asdict(self))
        d["architectures"] = ["GPTNeoXForCausalLM"]
        return d


def rotary_cos_sin(config: GPTNeoXConfig, position_ids, dtype):
    """cos, sin tables [batch, seq, rotary_ndims] for ``position_ids`` [batch, seq] (float32 math)."""
    dim = config.rotary_ndims
    inv_freq = np.float32(1.0) / (np.float32(config.rotary_emb_base) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class GPTNeoXAttention(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        h, d, r = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_ndims
        qkv = nn.Dense(3 * cfg.hidden_size, use_bias=cfg.attention_bias, dtype=self.dtype, name="query_key_value")(x)
        q, k, v = jnp.split(qkv.reshape(b, s, h, 3 * d), 3, axis=-1)  # per head: [q | k | v]

        def rotate(t):  # rotary on the first r dims of each head only
            return jnp.concatenate([apply_rope(t[..., :r], cos, sin), t[..., r:]], axis=-1)

        dropout_rng = None if deterministic or not cfg.attention_dropout else self.make_rng("dropout")
        out, new_cache = attend(rotate(q), rotate(k), v, attention_mask, layer_cache, cache_index,
                                dropout_rate=cfg.attention_dropout, dropout_rng=dropout_rng)
        out = nn.Dense(cfg.hidden_size, use_bias=cfg.attention_bias, dtype=self.dtype, name="dense")(
            out.reshape(b, s, h * d))
        return out, new_cache


class GPTNeoXMLP(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="dense_h_to_4h")(x))
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="dense_4h_to_h")(h)


class GPTNeoXLayer(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        drop = lambda t: nn.Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)  # noqa: E731
        attn, new_cache = GPTNeoXAttention(cfg, self.dtype, name="attention")(
            ln("input_layernorm")(x), cos, sin, attention_mask, layer_cache, cache_index, deterministic
        )
        attn = drop(attn)
        mlp = GPTNeoXMLP(cfg, self.dtype, name="mlp")
        if cfg.use_parallel_residual:
            return x + attn + drop(mlp(ln("post_attention_layernorm")(x))), new_cache
        x = x + attn
        return x + drop(mlp(ln("post_attention_layernorm")(x))), new_cache


class GPTNeoXModel(nn.Module):
    """The trunk (HF ``gpt_neox.*``). Returns (hidden after the final norm, new cache, embedding)."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_in")
        x = nn.Dropout(cfg.hidden_dropout)(embed(input_ids), deterministic=deterministic)
        cos, sin = rotary_cos_sin(cfg, position_ids, self.dtype)
        x, new_cache = run_layers(GPTNeoXLayer, cfg, self.dtype, "layers", x, (cos, sin, attention_mask), cache,
                                  deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        return x, new_cache, embed


class GPTNeoXForCausalLM(CausalLM):
    """GPT-NeoX causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: GPTNeoXConfig
    trunk_cls = GPTNeoXModel
    trunk_name = "gpt_neox"
    lm_head_name = "embed_out"


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "gpt_neox",
        Family(
            GPTNeoXConfig,
            GPTNeoXForCausalLM,
            linear_is_transposed=True,
            tied_key="embed_out.weight",
            # buffers older checkpoints (Pythia) store: the causal mask and the rotary table
            ignore_keys=(r"\.attention\.bias$", r"\.attention\.masked_bias$", r"rotary_emb\.inv_freq$"),
            add_prefix="gpt_neox.",
            trunk_cls=GPTNeoXModel,
            trunk_name="gpt_neox",
            hf_prefix="GPTNeoX",
            embed_key="gpt_neox.embed_in.weight",
        ),
    )


_register()
