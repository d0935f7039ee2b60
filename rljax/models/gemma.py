"""Gemma (v1) as a Flax linen module whose parameter names map one-to-one onto HF's.

The Llama layout (same HF names: ``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.norm``; weights are ``nn.Linear``, transposed on
load/save) with four differences, all here:

- embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the embedding dtype first,
  as HF does); the tied LM head reads the unscaled table;
- RMSNorm scales by ``1 + weight`` (its weights are stored centred on 0), in float32;
- the MLP is GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``. Older configs say ``hidden_act="gelu"``
  (or ``hidden_activation``); both mean the tanh approximation, as in transformers;
- ``head_dim`` is its own config field (256 in released checkpoints, not hidden / heads).

Attention (GQA, rotate-half RoPE) and the MLP reuse ``rljax.models.llama``'s blocks.
``attention_dropout`` (0 in every released checkpoint) drops attention probabilities in training
(``deterministic=False``), as Llama's does; there is no other dropout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import CausalLM, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS
from rljax.models.llama import LlamaAttention, LlamaMLP, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Fields named as in HF's Gemma ``config.json`` (5.x ``rope_parameters`` or legacy ``rope_theta``)."""

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 2
    eos_token_id: Any = 1
    pad_token_id: Optional[int] = 0
    model_type: str = "gemma"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.hidden_act == "gelu":  # the legacy value of released configs means the tanh approximation
            object.__setattr__(self, "hidden_act", "gelu_pytorch_tanh")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unknown hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}.")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # What the shared Llama blocks read.
    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    mlp_bias = False
    rope_type = "default"
    rope_scaling_dict = None

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        """From an HF config dict (transformers 4.x or 5.x)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if d.get("hidden_activation"):  # transformers 4.x: takes precedence over hidden_act
            kw["hidden_act"] = d["hidden_activation"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"Gemma rope scaling {rope_type!r} is not supported by rljax; only the default rotary "
                "embedding (rope_type 'default') is."
            )
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if d.get("use_bidirectional_attention"):
            raise ValueError(
                "use_bidirectional_attention=True (non-causal Gemma) is not supported by rljax's causal LM."
            )
        return cls(**kw)

    def to_dict(self) -> dict:
        """HF ``config.json`` contents (read by transformers 4.x and 5.x)."""
        d = drop_layer_options(dataclasses.asdict(self))
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["hidden_activation"] = self.hidden_act  # transformers 4.x reads this one
        d["architectures"] = ["GemmaForCausalLM"]
        return d


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight`` (HF name ``weight``, zeros at init), all in float32."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)


class GemmaDecoderLayer(nn.Module):
    config: GemmaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        h, new_cache = LlamaAttention(cfg, None, self.dtype, name="self_attn")(
            GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x),
            cos, sin, attention_mask, layer_cache, cache_index, deterministic,
        )
        x = x + h
        h = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(cfg, self.dtype, name="mlp")(h), new_cache


class GemmaModel(nn.Module):
    """The decoder trunk (HF ``model.*``). Returns (hidden after the final norm, new cache, embedding)."""

    config: GemmaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids)
        x = x * jnp.asarray(np.float32(np.sqrt(cfg.hidden_size))).astype(x.dtype)  # HF: scale in the embedding dtype
        cos, sin = rope_cos_sin(cfg, position_ids, self.dtype)
        x, new_cache = run_layers(GemmaDecoderLayer, cfg, self.dtype, "layers", x, (cos, sin, attention_mask), cache,
                                  deterministic)
        x = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        return x, new_cache, embed


class GemmaForCausalLM(CausalLM):
    """Gemma causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: GemmaConfig
    trunk_cls = GemmaModel
    trunk_name = "model"


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "gemma",
        Family(
            GemmaConfig,
            GemmaForCausalLM,
            linear_is_transposed=True,
            ignore_keys=(r"rotary_emb\.inv_freq$",),
            add_prefix="model.",
            trunk_cls=GemmaModel,
            trunk_name="model",
            hf_prefix="Gemma",
        ),
    )


_register()
