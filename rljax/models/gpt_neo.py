"""GPT-Neo as a Flax linen module whose parameter names map one-to-one onto HF's.

HF name                                            flax path
transformer.wte.weight, transformer.wpe.weight     transformer/wte/embedding, transformer/wpe/embedding
transformer.h.{i}.attn.attention.q_proj.weight     transformer/h_{i}/attn/attention/q_proj/kernel  (k_proj, v_proj:
                                                   no bias; out_proj has one)
transformer.h.{i}.mlp.c_fc.weight                  transformer/h_{i}/mlp/c_fc/kernel
transformer.ln_f.weight                            transformer/ln_f/scale
lm_head.weight                                     tied to wte (no separate parameter unless untied)

Weights are ``nn.Linear`` ([out, in]; transposed on load/save). GPT-2's block order with two
differences: attention scores are NOT scaled by 1 / sqrt(head_dim), and layers alternate
"global" (full causal) and "local" attention as ``attention_types`` says (``[[["global",
"local"], 12]]`` = 24 layers alternating). A local layer's query sees the previous
``window_size`` cache slots (itself included); rows are left-padded, so slots are tokens.
Positions are learned (``wpe``), a hard limit of ``max_position_embeddings``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
    """Fields named as in HF's GPT-Neo ``config.json``; ``attention_types`` is stored as nested tuples."""

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    attention_types: Tuple = ((("global", "local"), 12),)
    num_heads: int = 16
    intermediate_size: Optional[int] = None
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 50256
    eos_token_id: Any = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    model_type: str = "gpt_neo"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "attention_types", _freeze(self.attention_types))
        object.__setattr__(self, "eos_token_id", _freeze(self.eos_token_id))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}).")
        layers = self.attention_layers
        if len(layers) != self.num_layers or set(layers) - {"global", "local"}:
            raise ValueError(
                f"attention_types {self.attention_types} expands to {list(layers)}; it must give num_layers "
                f"({self.num_layers}) entries, each 'global' or 'local'."
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation_function {self.activation_function!r}; supported: {sorted(ACTIVATIONS)}."
            )

    @property
    def attention_layers(self) -> Tuple[str, ...]:
        """One "global"/"local" per layer, expanded from ``attention_types`` as HF does."""
        return tuple(kind for kinds, repeat in self.attention_types for _ in range(repeat) for kind in kinds)

    # Family-neutral names used by generation, heads and sharding.
    num_hidden_layers = property(lambda self: self.num_layers)
    num_attention_heads = property(lambda self: self.num_heads)
    num_key_value_heads = property(lambda self: self.num_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_heads)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTNeoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = drop_layer_options(dataclasses.asdict(self))
        d["attention_types"] = [[list(kinds), n] for kinds, n in self.attention_types]
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["architectures"] = ["GPTNeoForCausalLM"]
        return d


class GPTNeoSelfAttention(nn.Module):
    config: GPTNeoConfig
    window: Optional[int] = None  # local layers: config.window_size
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        shape = (b, s, cfg.num_heads, cfg.head_dim)
        dense = lambda name, bias=False: nn.Dense(cfg.hidden_size, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(name)(x).reshape(shape) for name in ("q_proj", "k_proj", "v_proj"))
        dropout_rng = None if deterministic or not cfg.attention_dropout else self.make_rng("dropout")
        out, new_cache = attend(q, k, v, attention_mask, layer_cache, cache_index, sliding_window=self.window,
                                dropout_rate=cfg.attention_dropout, dropout_rng=dropout_rng, scale=1.0)
        out = dense("out_proj", bias=True)(out.reshape(b, s, cfg.hidden_size))
        return nn.Dropout(cfg.resid_dropout)(out, deterministic=deterministic), new_cache


class GPTNeoAttention(nn.Module):
    """HF's wrapper level (``attn.attention.*``)."""

    config: GPTNeoConfig
    window: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        return GPTNeoSelfAttention(self.config, self.window, self.dtype, name="attention")(
            x, attention_mask, layer_cache, cache_index, deterministic)


class GPTNeoMLP(nn.Module):
    config: GPTNeoConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size or 4 * cfg.hidden_size, dtype=self.dtype, name="c_fc")(x)
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="c_proj")(ACTIVATIONS[cfg.activation_function](h))
        return nn.Dropout(cfg.resid_dropout)(h, deterministic=deterministic)


class GPTNeoBlock(nn.Module):
    config: GPTNeoConfig
    window: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name=name)  # noqa: E731
        h, new_cache = GPTNeoAttention(cfg, self.window, self.dtype, name="attn")(
            ln("ln_1")(x), attention_mask, layer_cache, cache_index, deterministic
        )
        x = x + h
        return x + GPTNeoMLP(cfg, self.dtype, name="mlp")(ln("ln_2")(x), deterministic), new_cache


class GPTNeoModel(nn.Module):
    """The trunk (HF ``transformer.*``). Returns (hidden after ln_f, new cache, embedding)."""

    config: GPTNeoConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="wte")
        wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="wpe")
        x = nn.Dropout(cfg.embed_dropout)(wte(input_ids) + wpe(position_ids), deterministic=deterministic)
        windows = [cfg.window_size if kind == "local" else None for kind in cfg.attention_layers]
        x, new_cache = run_layers(GPTNeoBlock, cfg, self.dtype, "h", x, (attention_mask,), cache, deterministic,
                                  lambda i: {"window": windows[i]})
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return x, new_cache, wte


class GPTNeoForCausalLM(CausalLM):
    """GPT-Neo causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: GPTNeoConfig
    trunk_cls = GPTNeoModel
    trunk_name = "transformer"
    positions_are_hard_limit = True


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "gpt_neo",
        Family(
            GPTNeoConfig,
            GPTNeoForCausalLM,
            linear_is_transposed=True,
            ignore_keys=(r"\.attn\.attention\.bias$", r"\.attn\.attention\.masked_bias$"),  # old mask buffers
            add_prefix="transformer.",
            trunk_cls=GPTNeoModel,
            trunk_name="transformer",
            hf_prefix="GPTNeo",
        ),
    )


_register()
