"""A small text-conditioned pixel-space denoiser (a two-level U-Net with one cross-attention
block) and a tiny word-level text encoder: the embedded default for DDPO on 2 CPU cores.

Shapes: images / latents ``[B, H, W, C]`` (Flax's channels-last), timesteps ``[B]`` int,
prompt embeddings ``[B, L, D]``. With the defaults (16x16x1, features (32, 64), D=32) the
denoiser has about 0.2M parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["timestep_embedding", "TinyConditionalUNet", "WordTokenizer", "TinyTextEncoder"]


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[B] -> [B, dim]`` (cos first, as diffusers' ``flip_sin_to_cos``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the (time + condition) embedding, twice; residual."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(x)))
        h = h + nn.Dense(self.features)(nn.silu(emb))[:, None, None, :]
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(h)))
        skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1))(x)
        return skip + h


class CrossAttention(nn.Module):
    """Pixels attend to the prompt tokens (diffusers' ``to_q/to_k/to_v/to_out`` names)."""

    features: int
    num_heads: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q_in = nn.LayerNorm()(x).reshape(b, h * w, c)
        hd = self.features // self.num_heads
        q = nn.Dense(self.features, use_bias=False, name="to_q")(q_in).reshape(b, h * w, self.num_heads, hd)
        k = nn.Dense(self.features, use_bias=False, name="to_k")(context).reshape(b, -1, self.num_heads, hd)
        v = nn.Dense(self.features, use_bias=False, name="to_v")(context).reshape(b, -1, self.num_heads, hd)
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, h * w, self.features)
        return x + nn.Dense(c, name="to_out_0")(out).reshape(b, h, w, c)


class TinyConditionalUNet(nn.Module):
    """epsilon-prediction U-Net: ``(x [B,H,W,C], t [B], context [B,L,D]) -> [B,H,W,C]``.

    H and W must be divisible by 2. The pooled context joins the time embedding (FiLM-like
    conditioning of every block) and the bottleneck cross-attends to the context tokens.
    """

    out_channels: int = 1
    features: Sequence[int] = (32, 64)
    time_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        f0, f1 = self.features
        emb = timestep_embedding(timesteps, self.time_dim)
        emb = nn.Dense(self.time_dim)(nn.silu(nn.Dense(self.time_dim)(emb)))
        emb = emb + nn.Dense(self.time_dim)(context.mean(axis=1))
        h0 = ResBlock(f0)(nn.Conv(f0, (3, 3))(x), emb)
        h = nn.Conv(f1, (3, 3), strides=(2, 2))(h0)
        h = ResBlock(f1)(h, emb)
        h = CrossAttention(f1)(h, context)
        h = ResBlock(f1)(h, emb)
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
        h = nn.Conv(f0, (3, 3))(h)
        h = ResBlock(f0)(jnp.concatenate([h, h0], axis=-1), emb)
        return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(nn.GroupNorm(8)(h)))


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary (pad id 0, unk id 1), padded and
    truncated to ``model_max_length`` like ``padding="max_length", truncation=True``."""

    pad_token, unk_token = "<pad>", "<unk>"

    def __init__(self, words: Sequence[str], model_max_length: int = 4):
        self.vocab = [self.pad_token, self.unk_token] + [w for w in dict.fromkeys(w.lower() for w in words)]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.model_max_length = int(model_max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """``[B, model_max_length]`` int32 token ids."""
        out = np.zeros((len(prompts), self.model_max_length), np.int32)
        for i, p in enumerate(prompts):
            toks = [self.ids.get(w, 1) for w in p.lower().split()][: self.model_max_length]
            out[i, : len(toks)] = toks
        return out

    def batch_decode(self, ids: np.ndarray, skip_special_tokens: bool = True) -> list:
        special = {0, 1} if skip_special_tokens else set()
        return [" ".join(self.vocab[int(t)] for t in row if int(t) not in special) for row in np.asarray(ids)]


class TinyTextEncoder(nn.Module):
    """Token + position embeddings and one MLP: ``[B, L] ids -> [B, L, D]`` (frozen in DDPO)."""

    vocab_size: int
    max_length: int = 4
    dim: int = 32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab_size, self.dim)(ids) + self.param(
            "position_embedding", nn.initializers.normal(0.02), (self.max_length, self.dim))[: ids.shape[1]]
        return nn.LayerNorm()(h + nn.Dense(self.dim)(nn.gelu(nn.Dense(self.dim)(h))))
