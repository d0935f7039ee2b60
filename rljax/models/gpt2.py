"""GPT-2 as a Flax linen module whose parameter names map one-to-one onto HF's.

HF name                              flax path
transformer.wte.weight               transformer/wte/embedding
transformer.h.{i}.attn.c_attn.weight transformer/h_{i}/attn/c_attn/kernel   (HF Conv1D is [in, out]: no transpose)
transformer.h.{i}.ln_1.weight        transformer/h_{i}/ln_1/scale
lm_head.weight                       lm_head/kernel (nn.Linear, [out, in]) only when tie_word_embeddings
                                     is false; tied models reuse wte (no separate parameter)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Fields named as in HF's GPT-2 ``config.json``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    model_type: str = "gpt2"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    # Family-neutral names used by generation, heads and sharding.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError(
                "GPT-2 configs with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not "
                "supported by rljax; set both to false in config.json."
            )
        if kw.get("activation_function", "gelu_new") not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation_function {kw['activation_function']!r}; supported: {sorted(ACTIVATIONS)}."
            )
        return cls(**kw)

    def to_dict(self) -> dict:
        d = drop_layer_options(dataclasses.asdict(self))
        d["architectures"] = ["GPT2LMHeadModel"]
        d["n_ctx"] = self.n_positions
        return d


class GPT2Attention(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        qkv = nn.Dense(3 * cfg.n_embd, dtype=self.dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (b, s, cfg.n_head, cfg.head_dim)
        # attn_pdrop drops attention probabilities in training (HF's attn_dropout); eval is exact.
        dropout_rng = None if deterministic or not cfg.attn_pdrop else self.make_rng("dropout")
        out, new_cache = attend(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), attention_mask, layer_cache, cache_index,
            dropout_rate=cfg.attn_pdrop, dropout_rng=dropout_rng,
        )
        out = nn.Dense(cfg.n_embd, dtype=self.dtype, name="c_proj")(out.reshape(b, s, cfg.n_embd))
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, new_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        inner = cfg.n_inner or 4 * cfg.n_embd
        h = ACTIVATIONS[cfg.activation_function](nn.Dense(inner, dtype=self.dtype, name="c_fc")(x))
        h = nn.Dense(cfg.n_embd, dtype=self.dtype, name="c_proj")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name=name)  # noqa: E731
        h, new_cache = GPT2Attention(cfg, self.dtype, name="attn")(
            ln("ln_1")(x), attention_mask, layer_cache, cache_index, deterministic
        )
        x = x + h
        x = x + GPT2MLP(cfg, self.dtype, name="mlp")(ln("ln_2")(x), deterministic)
        return x, new_cache


class GPT2Model(nn.Module):
    """The transformer trunk (HF ``transformer.*``)."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype, name="wpe")
        x = wte(input_ids) + wpe(position_ids)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)
        x, new_cache = run_layers(GPT2Block, cfg, self.dtype, "h", x, (attention_mask,), cache, deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return x, new_cache, wte


class GPT2LMHeadModel(CausalLM):
    """GPT-2 causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: GPT2Config
    trunk_cls = GPT2Model
    trunk_name = "transformer"
    positions_are_hard_limit = True


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "gpt2",
        Family(
            GPT2Config,
            GPT2LMHeadModel,
            linear_is_transposed=False,
            ignore_keys=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
            add_prefix="transformer.",
            trunk_cls=GPT2Model,
            trunk_name="transformer",
            hf_prefix="GPT2",
        ),
    )


_register()
