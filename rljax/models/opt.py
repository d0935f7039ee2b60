"""OPT (Meta's Open Pre-trained Transformers) as a Flax linen module whose parameter names map
one-to-one onto HF's.

HF name                                          flax path
model.decoder.embed_tokens.weight                model/decoder/embed_tokens/embedding  [vocab, word_embed_proj_dim]
model.decoder.embed_positions.weight             model/decoder/embed_positions/embedding  [max_positions + 2, hidden]
model.decoder.project_in.weight                  model/decoder/project_in/kernel   (only when word_embed_proj_dim
model.decoder.project_out.weight                 model/decoder/project_out/kernel   != hidden_size; no bias)
model.decoder.layers.{i}.self_attn.q_proj.weight model/decoder/layers_{i}/self_attn/q_proj/kernel
model.decoder.layers.{i}.fc1.weight              model/decoder/layers_{i}/fc1/kernel
model.decoder.layers.{i}.self_attn_layer_norm.weight model/decoder/layers_{i}/self_attn_layer_norm/scale
model.decoder.final_layer_norm.weight            model/decoder/final_layer_norm/scale (pre-LN models only)
lm_head.weight                                   lm_head/kernel (absent when tie_word_embeddings, the default)

Weights are ``nn.Linear`` ([out, in]; transposed on load/save). Learned positions: token at
position p reads ``embed_positions[p + 2]`` (OPT reserves the first two rows). Positions come
from ``position_ids`` (default ``cumsum(mask) - 1``, so left-padded rows start at 0, as HF's).
``do_layer_norm_before``: pre-LN blocks plus a final norm (125m, 1.3b, ...) or post-LN blocks
with no final norm (350m). The trunk's output is projected to ``word_embed_proj_dim`` before
the (tied) LM head, so the value and score heads read that width, as TRL's value head does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Fields named as in HF's OPT ``config.json``. ``word_embed_proj_dim`` None means ``hidden_size``."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: Optional[int] = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 2
    eos_token_id: Optional[int] = 2
    model_type: str = "opt"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation_function {self.activation_function!r}; supported: {sorted(ACTIVATIONS)}."
            )
        if self.layerdrop:
            raise ValueError(
                f"layerdrop={self.layerdrop} (skipping whole layers at random in training) is not supported by "
                "rljax; set layerdrop to 0 in config.json (every released OPT checkpoint has 0)."
            )

    # Family-neutral names used by generation, heads and sharding.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def initializer_range(self) -> float:
        return self.init_std

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @classmethod
    def from_dict(cls, d: dict) -> "OPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = drop_layer_options(dataclasses.asdict(self))
        d["architectures"] = ["OPTForCausalLM"]
        return d


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        shape = (b, s, cfg.num_attention_heads, cfg.head_dim)
        dense = lambda name: nn.Dense(cfg.hidden_size, use_bias=cfg.enable_bias, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(n)(x).reshape(shape) for n in ("q_proj", "k_proj", "v_proj"))
        dropout_rng = None if deterministic or not cfg.attention_dropout else self.make_rng("dropout")
        out, new_cache = attend(q, k, v, attention_mask, layer_cache, cache_index,
                                dropout_rate=cfg.attention_dropout, dropout_rng=dropout_rng)
        return dense("out_proj")(out.reshape(b, s, cfg.hidden_size)), new_cache


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        pre = cfg.do_layer_norm_before
        affine = cfg.layer_norm_elementwise_affine
        attn_norm, mlp_norm = (nn.LayerNorm(epsilon=1e-5, use_bias=affine, use_scale=affine, dtype=self.dtype, name=n)
                               for n in ("self_attn_layer_norm", "final_layer_norm"))
        drop = lambda t: nn.Dropout(cfg.dropout)(t, deterministic=deterministic)  # noqa: E731
        dense = lambda f, name: nn.Dense(f, use_bias=cfg.enable_bias, dtype=self.dtype, name=name)  # noqa: E731

        h, new_cache = OPTAttention(cfg, self.dtype, name="self_attn")(
            attn_norm(x) if pre else x, attention_mask, layer_cache, cache_index, deterministic
        )
        x = x + drop(h)
        if not pre:
            x = attn_norm(x)
        h = mlp_norm(x) if pre else x
        h = dense(cfg.hidden_size, "fc2")(ACTIVATIONS[cfg.activation_function](dense(cfg.ffn_dim, "fc1")(h)))
        x = x + drop(h)
        if not pre:
            x = mlp_norm(x)
        return x, new_cache


class OPTDecoder(nn.Module):
    """HF ``model.decoder``: embeddings (+ project_in), the layers, final norm (+ project_out)."""

    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        projected = cfg.word_embed_proj_dim != cfg.hidden_size
        embed = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim, dtype=self.dtype, name="embed_tokens")
        positions = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, dtype=self.dtype,
                             name="embed_positions")
        x = embed(input_ids)
        if projected:
            x = nn.Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype, name="project_in")(x)
        x = x + positions(position_ids + POSITION_OFFSET)
        x, new_cache = run_layers(OPTDecoderLayer, cfg, self.dtype, "layers", x, (attention_mask,), cache, deterministic)
        if cfg.has_final_layer_norm:
            affine = cfg.layer_norm_elementwise_affine
            x = nn.LayerNorm(epsilon=1e-5, use_bias=affine, use_scale=affine, dtype=self.dtype,
                             name="final_layer_norm")(x)
        if projected:
            x = nn.Dense(cfg.word_embed_proj_dim, use_bias=False, dtype=self.dtype, name="project_out")(x)
        return x, new_cache, embed


class OPTModel(nn.Module):
    """The trunk (HF ``model.*``, which only holds ``decoder``). Returns (hidden [batch, seq,
    word_embed_proj_dim], new cache, embedding)."""

    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        return OPTDecoder(self.config, self.dtype, name="decoder")(
            input_ids, attention_mask, position_ids, cache, deterministic
        )


class OPTForCausalLM(CausalLM):
    """OPT causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: OPTConfig
    trunk_cls = OPTModel
    trunk_name = "model"
    positions_are_hard_limit = True


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "opt",
        Family(
            OPTConfig,
            OPTForCausalLM,
            linear_is_transposed=True,
            add_prefix="model.",
            trunk_cls=OPTModel,
            trunk_name="model",
            hf_prefix="OPT",
            embed_key="model.decoder.embed_tokens.weight",
        ),
    )


_register()
