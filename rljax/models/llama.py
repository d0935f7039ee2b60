"""The Llama family as one Flax linen module: Llama 2/3, Mistral and Qwen2.

The three HF architectures differ only in flags, all read from ``config.json``:

model_type  q/k/v bias          o_proj bias      sliding window
llama       attention_bias      attention_bias   none
mistral     none                none             ``sliding_window`` on every layer (None = off)
qwen2       always              none             ``use_sliding_window``: layers named "sliding_attention"
                                                 in ``layer_types`` (default: index >= max_window_layers)

Parameter names map one-to-one onto HF's (``nn.Linear`` weights are ``[out, in]``,
so kernels are transposed on load/save):

HF name                                   flax path
model.embed_tokens.weight                 model/embed_tokens/embedding
model.layers.{i}.self_attn.q_proj.weight  model/layers_{i}/self_attn/q_proj/kernel
model.layers.{i}.mlp.gate_proj.weight     model/layers_{i}/mlp/gate_proj/kernel
model.layers.{i}.input_layernorm.weight   model/layers_{i}/input_layernorm/weight
model.norm.weight                         model/norm/weight
lm_head.weight                            lm_head/kernel (absent when tie_word_embeddings)

RoPE is computed from ``position_ids`` (so left-padded rows start at 0), with
rope_scaling types "default", "linear", "llama3" and "dynamic" (NTK). "dynamic"
rescales by the largest position in the current call; HF additionally remembers
the largest length seen by the module object, a hidden state we do not copy.
``attention_dropout`` (0 in every released checkpoint) drops attention probabilities in
training (``deterministic=False`` with a "dropout" rng), as HF's ``attention_dropout`` does;
evaluation is exact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rljax.models.attention import CausalLM, attend, drop_layer_options, run_layers
from rljax.models.gpt2 import ACTIVATIONS

ARCHITECTURE_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def _freeze(value):
    """dicts/lists from config.json -> hashable tuples (flax modules hash their config)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Fields named as in HF's Llama/Mistral/Qwen2 ``config.json``; ``model_type`` picks the flags.

    ``num_key_value_heads`` and ``head_dim`` default (None) to ``num_attention_heads`` and
    ``hidden_size // num_attention_heads``. ``rope_scaling`` is stored as a sorted tuple of
    (key, value) pairs (hashable); ``rope_scaling_dict`` gives it back as a dict.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Tuple] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: Optional[Tuple[str, ...]] = None
    bos_token_id: Any = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None
    model_type: str = "llama"
    # rljax-only layer options (not in config.json): see rljax.models.attention.run_layers
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if self.model_type not in ARCHITECTURE_PREFIX:
            raise ValueError(
                f"LlamaConfig model_type must be one of {sorted(ARCHITECTURE_PREFIX)}, got {self.model_type!r}."
            )
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        for name in ("rope_scaling", "layer_types", "eos_token_id", "bos_token_id"):
            set_(name, _freeze(getattr(self, name)))
        if self.model_type != "llama":  # Mistral and Qwen2 have fixed bias layouts
            set_("attention_bias", False)
            set_("mlp_bias", False)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unknown hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}.")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported by rljax (supported: {list(ROPE_TYPES)})."
            )
        params = self.rope_scaling_dict or {}
        need = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
        absent = [k for k in need if k not in params]
        if absent:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {absent}; got {params}.")
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by the Llama family.")

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        d = self.rope_scaling_dict or {}
        return d.get("rope_type", d.get("type", "default"))

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    def layer_sliding_window(self, i: int) -> Optional[int]:
        """The attention window of layer ``i`` (None: full causal attention)."""
        if self.model_type == "mistral":
            return self.sliding_window
        if self.model_type == "qwen2" and self.use_sliding_window and self.sliding_window is not None:
            if self.layer_types is not None:
                return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
            return self.sliding_window if i >= self.max_window_layers else None
        return None

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From an HF config dict (legacy ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("model_type", d.get("model_type", "llama"))
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope and all(isinstance(v, dict) for v in rope.values()):
            raise ValueError("Per-layer-type rope_parameters are not supported by the Llama family.")
        kw["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        kw["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if kw["model_type"] == "mistral" and "sliding_window" not in d:
            kw["sliding_window"] = 4096  # transformers' MistralConfig default
        return cls(**kw)

    def to_dict(self) -> dict:
        """HF ``config.json`` contents (legacy rope fields, read by transformers 4.x and 5.x)."""
        d = drop_layer_options(dataclasses.asdict(self))
        for k in ("eos_token_id", "bos_token_id", "layer_types"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        scaling = self.rope_scaling_dict
        if scaling is not None:
            scaling = dict(scaling)
            scaling["type"] = scaling["rope_type"]  # transformers < 4.43 reads "type"
        d["rope_scaling"] = scaling
        drop = {
            "llama": ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
            "mistral": ("attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers", "layer_types"),
            "qwen2": ("attention_bias", "mlp_bias"),
        }[self.model_type]
        for k in drop:
            d.pop(k)
        if d.get("layer_types") is None:
            d.pop("layer_types", None)
        d["architectures"] = [f"{ARCHITECTURE_PREFIX[self.model_type]}ForCausalLM"]
        return d


# --- rotary position embedding -------------------------------------------------------------


def _base_inv_freq(theta, dim: int):
    """1 / theta^(2i/dim), float32 like HF's. Works for a python float or a traced scalar."""
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    if isinstance(theta, (int, float)):
        return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    return 1.0 / (theta.astype(jnp.float32) ** jnp.asarray(exps))


def _llama3_inv_freq(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    factor = np.float32(params["factor"])
    low, high = np.float32(params["low_freq_factor"]), np.float32(params["high_freq_factor"])
    old_len = np.float32(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(config: LlamaConfig, position_ids: Optional[jax.Array] = None):
    """Inverse frequencies [head_dim // 2] for the config's rope type ("dynamic" needs position_ids)."""
    dim, kind, params = config.head_dim, config.rope_type, config.rope_scaling_dict or {}
    if kind == "default":
        return _base_inv_freq(config.rope_theta, dim)
    if kind == "linear":
        return _base_inv_freq(config.rope_theta, dim) / np.float32(params["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(config.rope_theta, dim), params)
    # dynamic NTK: grow the base once the longest position exceeds max_position_embeddings
    factor, max_pos = params["factor"], config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(position_ids) + 1, max_pos).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def rope_cos_sin(config: LlamaConfig, position_ids: jax.Array, dtype) -> Tuple[jax.Array, jax.Array]:
    """cos, sin tables [batch, seq, head_dim] for ``position_ids`` [batch, seq]."""
    inv_freq = jnp.asarray(rope_inv_freq(config, position_ids), jnp.float32)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [batch, seq, heads, head_dim] by the tables (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- modules --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a ``weight`` parameter (HF name); statistics in float32."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    sliding_window: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, layer_cache, cache_index, deterministic: bool = True):
        cfg = self.config
        b, s, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def proj(name, heads):
            return nn.Dense(heads * d, use_bias=cfg.qkv_bias, dtype=self.dtype, name=name)(x).reshape(b, s, heads, d)

        q = apply_rope(proj("q_proj", h), cos, sin)
        k = apply_rope(proj("k_proj", kv), cos, sin)
        v = proj("v_proj", kv)
        # attention_dropout drops attention probabilities in training only; eval is exact.
        dropout_rng = None if deterministic or not cfg.attention_dropout else self.make_rng("dropout")
        out, new_cache = attend(q, k, v, attention_mask, layer_cache, cache_index, sliding_window=self.sliding_window,
                                dropout_rate=cfg.attention_dropout, dropout_rng=dropout_rng)
        out = nn.Dense(cfg.hidden_size, use_bias=cfg.o_bias, dtype=self.dtype, name="o_proj")(out.reshape(b, s, h * d))
        return out, new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda n, f: nn.Dense(f, use_bias=cfg.mlp_bias, dtype=self.dtype, name=n)  # noqa: E731
        act = ACTIVATIONS[cfg.hidden_act]
        return dense("down_proj", cfg.hidden_size)(act(dense("gate_proj", cfg.intermediate_size)(x))
                                                  * dense("up_proj", cfg.intermediate_size)(x))


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    sliding_window: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, layer_cache, cache_index, deterministic: bool = True):
        cfg = self.config
        h, new_cache = LlamaAttention(cfg, self.sliding_window, self.dtype, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x),
            cos, sin, attention_mask, layer_cache, cache_index, deterministic,
        )
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, self.dtype, name="mlp")(h)
        return x, new_cache


class LlamaModel(nn.Module):
    """The decoder trunk (HF ``model.*``). Returns (hidden after the final norm, new cache, embedding)."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, deterministic):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids)
        cos, sin = rope_cos_sin(cfg, position_ids, self.dtype)
        x, new_cache = run_layers(LlamaDecoderLayer, cfg, self.dtype, "layers", x, (cos, sin, attention_mask), cache,
                                  deterministic, lambda i: {"sliding_window": cfg.layer_sliding_window(i)})
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        return x, new_cache, embed


class LlamaForCausalLM(CausalLM):
    """Llama/Mistral/Qwen2 causal LM: the same contract as ``GPT2LMHeadModel`` (see
    ``rljax.models.attention.CausalLM``)."""

    config: LlamaConfig
    trunk_cls = LlamaModel
    trunk_name = "model"


def _register() -> None:
    from rljax.models.hub import Family, register_family

    for model_type, prefix in ARCHITECTURE_PREFIX.items():
        register_family(
            model_type,
            Family(
                LlamaConfig,
                LlamaForCausalLM,
                linear_is_transposed=True,
                ignore_keys=(r"rotary_emb\.inv_freq$",),
                add_prefix="model.",
                trunk_cls=LlamaModel,
                trunk_name="model",
                hf_prefix=prefix,
            ),
        )


_register()
