"""GPT-J as a Flax linen module whose parameter names map one-to-one onto HF's.

HF name                                  flax path
transformer.wte.weight                   transformer/wte/embedding
transformer.h.{i}.ln_1.weight            transformer/h_{i}/ln_1/scale
transformer.h.{i}.attn.q_proj.weight     transformer/h_{i}/attn/q_proj/kernel   (also k_proj, v_proj, out_proj; no bias)
transformer.h.{i}.mlp.fc_in.weight       transformer/h_{i}/mlp/fc_in/kernel     (fc_in, fc_out have biases)
transformer.ln_f.weight                  transformer/ln_f/scale
lm_head.weight, lm_head.bias             lm_head/kernel, lm_head/bias           (untied, with a bias)

Weights are ``nn.Linear`` ([out, in]; transposed on load/save). The block is parallel: one
LayerNorm feeds both branches, ``x + attn(ln_1(x)) + mlp(ln_1(x))``. Rotary embeddings use the
interleaved layout (pairs ``(x[2i], x[2i+1])`` rotate together, HF's ``rotate_every_two``) on the
first ``rotary_dim`` dims of each head; positions index a sinusoid table of ``n_positions`` rows in
HF, so they are a hard limit here too. CodeGen (``rljax.models.codegen``) reuses everything but
the attention projections.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Fields named as in HF's GPT-J ``config.json``."""

    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: Optional[int] = 64
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 50256
    eos_token_id: Any = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    model_type: str = "gptj"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).")
        if self.rotary_dim is None or not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_dim must be an even number of dims in (0, head_dim={self.head_dim}], got {self.rotary_dim}; "
                "set it in config.json (64 in GPT-J-6B)."
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation_function {self.activation_function!r}; supported: {sorted(ACTIVATIONS)}."
            )
        if self.tie_word_embeddings:
            raise ValueError(
                f"tie_word_embeddings=True is not supported for {self.model_type}: its lm_head has a bias that a tied "
                "head would keep separately; save the checkpoint untied (tie_word_embeddings=false)."
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # Family-neutral names used by generation, heads and sharding.
    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.n_embd // self.n_head)
    max_position_embeddings = property(lambda self: self.n_positions)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = drop_layer_options(dataclasses.asdict(self))
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["architectures"] = ["GPTJForCausalLM"]
        return d


# --- interleaved rotary embedding ---------------------------------------------------------------


def sinusoid_sin_cos(position_ids, rotary_dim: int):
    """sin, cos [batch, seq, rotary_dim] (float32), each frequency repeated for its pair of dims."""
    inv_freq = np.float32(1.0) / np.float32(10000.0) ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.repeat(jnp.sin(angles), 2, axis=-1), jnp.repeat(jnp.cos(angles), 2, axis=-1)


def apply_rotary_every_two(x, sin, cos):
    """Rotate the first ``sin.shape[-1]`` dims of ``x`` [batch, seq, heads, head_dim] pairwise
    (interleaved layout); the rest pass through. Computed in the tables' dtype, returned in x's."""
    r = sin.shape[-1]
    rot = x[..., :r].astype(sin.dtype)
    pairs = jnp.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    rot = rot * cos[:, :, None, :] + pairs * sin[:, :, None, :]
    return jnp.concatenate([rot.astype(x.dtype), x[..., r:]], axis=-1)


# --- modules --------------------------------------------------------------------------------


class GPTJAttention(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    def project_qkv(self, x):
        """q, k, v [batch, seq, heads, head_dim] from separate bias-free projections."""
        cfg = self.config
        shape = (*x.shape[:2], cfg.n_head, cfg.head_dim)
        dense = lambda name: nn.Dense(cfg.n_embd, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        return tuple(dense(name)(x).reshape(shape) for name in ("q_proj", "k_proj", "v_proj"))

    def rotary_tables(self, position_ids):
        """GPT-J casts the sinusoid table to the activations' dtype before rotating."""
        return [t.astype(self.dtype) for t in sinusoid_sin_cos(position_ids, self.config.rotary_dim)]

    @nn.compact
    def __call__(self, x, position_ids, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        sin, cos = self.rotary_tables(position_ids)
        q, k = apply_rotary_every_two(q, sin, cos), apply_rotary_every_two(k, sin, cos)
        # attn_pdrop drops attention probabilities in training (HF's attn_dropout); eval is exact.
        dropout_rng = None if deterministic or not cfg.attn_pdrop else self.make_rng("dropout")
        out, new_cache = attend(q, k, v, attention_mask, layer_cache, cache_index,
                                dropout_rate=cfg.attn_pdrop, dropout_rng=dropout_rng)
        out = nn.Dense(cfg.n_embd, use_bias=False, dtype=self.dtype, name="out_proj")(out.reshape(b, s, cfg.n_embd))
        return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), new_cache


class GPTJMLP(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        h = ACTIVATIONS[cfg.activation_function](
            nn.Dense(cfg.n_inner or 4 * cfg.n_embd, dtype=self.dtype, name="fc_in")(x))
        h = nn.Dense(cfg.n_embd, dtype=self.dtype, name="fc_out")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class GPTJBlock(nn.Module):
    """Parallel block: ``x + attn(ln_1(x)) + mlp(ln_1(x))``."""

    config: GPTJConfig
    dtype: Any = jnp.float32
    attention_cls: ClassVar[Any] = GPTJAttention

    @nn.compact
    def __call__(self, x, position_ids, attention_mask, layer_cache, cache_index, deterministic):
        cfg = self.config
        h = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_1")(x)
        attn, new_cache = self.attention_cls(cfg, self.dtype, name="attn")(
            h, position_ids, attention_mask, layer_cache, cache_index, deterministic
        )
        return x + attn + GPTJMLP(cfg, self.dtype, name="mlp")(h, deterministic), new_cache


class GPTJModel(nn.Module):
    """The trunk (HF ``transformer.*``). Returns (hidden after ln_f, new cache, embedding)."""

    config: GPTJConfig
    dtype: Any = jnp.float32
    block_cls: ClassVar[Any] = GPTJBlock

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, name="wte")
        x = nn.Dropout(cfg.embd_pdrop)(embed(input_ids), deterministic=deterministic)
        x, new_cache = run_layers(self.block_cls, cfg, self.dtype, "h", x, (position_ids, attention_mask), cache,
                                  deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return x, new_cache, embed


class GPTJForCausalLM(CausalLM):
    """GPT-J causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: GPTJConfig
    trunk_cls = GPTJModel
    trunk_name = "transformer"
    positions_are_hard_limit = True
    lm_head_bias = True


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "gptj",
        Family(
            GPTJConfig,
            GPTJForCausalLM,
            linear_is_transposed=True,
            ignore_keys=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),  # causal-mask buffers of old checkpoints
            add_prefix="transformer.",
            trunk_cls=GPTJModel,
            trunk_name="transformer",
            hf_prefix="GPTJ",
        ),
    )


_register()
