"""transformers' ``CLIPTextModel`` (Stable Diffusion's text encoder) in Flax, loading
transformers checkpoints (``model.safetensors``, names one-to-one, ``rljax.diffusion.sd_io``).

``input_ids`` ``[B, L]`` -> ``last_hidden_state`` ``[B, L, hidden_size]`` (what Stable
Diffusion conditions on): token + position embeddings, pre-LayerNorm encoder layers with causal
self-attention and a ``fc1 -> act -> fc2`` MLP, ``final_layer_norm``. No attention mask (Stable
Diffusion's pipeline passes none to CLIP; the causal mask keeps padding after the prompt from
changing the prompt's positions).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.diffusion.sd_io import (
    TRANSFORMERS_WEIGHTS,
    load_safetensors_folder,
    read_json,
    save_safetensors_folder,
    torch_state_dict_to_params,
)

__all__ = ["CLIPTextConfig", "CLIPTextModel", "load_clip_text", "save_clip_text"]

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' ``CLIPTextConfig`` fields the forward reads (same names and defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"CLIPTextConfig hidden_act={self.hidden_act!r} is not supported (supported: "
                             f"{sorted(_ACTS)}).")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPTextConfig":
        """From a transformers ``config.json`` of a ``CLIPTextModel`` (``model_type`` ``clip_text_model``).
        The generic fields (dropouts, init ranges, token ids, dtype) do not change the inference
        forward and are not read."""
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"text_encoder config model_type={model_type!r}: rljax implements CLIPTextModel "
                             "('clip_text_model') only.")
        arch = d.get("architectures") or ["CLIPTextModel"]
        if any(a != "CLIPTextModel" for a in arch):
            raise ValueError(f"text_encoder config architectures={arch}: rljax implements CLIPTextModel only.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _Attention(nn.Module):
    heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, self.heads, hd)

        q, k, v = proj("q_proj") * hd**-0.5, proj("k_proj"), proj("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        causal = jnp.tril(jnp.ones((n, n), bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config

        def ln(name):
            return nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, dtype=self.dtype, name=name)

        x = x + _Attention(c.num_attention_heads, self.dtype, name="self_attn")(ln("layer_norm1")(x))
        h = ln("layer_norm2")(x)
        mlp = _MLP(c.intermediate_size, c.hidden_size, c.hidden_act, self.dtype, name="mlp")
        return x + mlp(h)


class _MLP(nn.Module):
    inner: int
    out: int
    act: str
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h = _ACTS[self.act](nn.Dense(self.inner, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.out, dtype=self.dtype, name="fc2")(h)


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        emb = _Embeddings(c, self.dtype, name="embeddings")(input_ids)
        enc = _Encoder(c, self.dtype, name="encoder")(emb)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                            name="final_layer_norm")(enc)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(input_ids.shape[1])[None])
        return tok + pos


class _Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextModel(nn.Module):
    """``input_ids`` ``[B, L]`` int (``L <= max_position_embeddings``) -> ``[B, L, hidden_size]``
    float32 last hidden state (params under ``text_model``, transformers' names)."""

    config: CLIPTextConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        chex.assert_rank(input_ids, 2)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; CLIP's max_position_embeddings is "
                             f"{self.config.max_position_embeddings}: truncate the prompts.")
        return _TextTransformer(self.config, self.dtype, name="text_model")(input_ids).astype(jnp.float32)


def load_clip_text(folder: str, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> Tuple[CLIPTextModel, Any]:
    """``(module, params)`` from a transformers ``text_encoder/`` folder (``config.json`` +
    ``model.safetensors``)."""
    config = CLIPTextConfig.from_dict(read_json(folder, "config.json"))
    module = CLIPTextModel(config, dtype=dtype)
    template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    params = torch_state_dict_to_params(load_safetensors_folder(folder), template,
                                        what=f"text_encoder ({os.path.basename(folder.rstrip('/'))})",
                                        ignore=(r"position_ids$",), dtype=param_dtype,
                                        rename=((r"^(?!text_model\.)", "text_model."),))  # transformers 5 drops it
    return module, params


def save_clip_text(folder: str, module: CLIPTextModel, params: Any) -> None:
    """transformers' ``text_encoder/`` folder (``config.json`` + ``model.safetensors``)."""
    cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(module.config)}
    save_safetensors_folder(folder, params, cfg, weights_name=TRANSFORMERS_WEIGHTS)
