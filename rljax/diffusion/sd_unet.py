"""diffusers' ``UNet2DConditionModel`` (the Stable Diffusion denoiser) in Flax, loading diffusers
checkpoints with parameter names one-to-one (``rljax.diffusion.sd_io``).

Layout: channels-last. ``sample`` ``[B, H, W, C]``, ``timesteps`` ``[B]`` (or ``[]``),
``encoder_hidden_states`` ``[B, L, D]`` -> ``[B, H, W, out_channels]``; ``H`` and ``W`` divisible by
``2 ** (len(block_out_channels) - 1)``.

Supported config (the Stable Diffusion 1.x/2.x family and diffusers' tiny test configs): down
blocks ``CrossAttnDownBlock2D`` / ``DownBlock2D``, up blocks ``CrossAttnUpBlock2D`` / ``UpBlock2D``,
mid block ``UNetMidBlock2DCrossAttn``, per-block ``layers_per_block`` / ``attention_head_dim``
(diffusers' name for the number of heads) / ``transformer_layers_per_block`` / ``cross_attention_dim``,
``use_linear_projection``, ``flip_sin_to_cos`` / ``freq_shift``, ``center_input_sample``,
``conv_in_kernel`` / ``conv_out_kernel``, ``time_embedding_dim``. Any other non-default field
raises a ValueError naming it (:meth:`UNet2DConditionConfig.from_dict`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Dict, Optional, Tuple, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.diffusion.sd_io import (
    DIFFUSERS_WEIGHTS,
    check_config_fields,
    load_safetensors_folder,
    read_json,
    save_safetensors_folder,
    torch_state_dict_to_params,
)

__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel", "ResnetBlock2D", "Attention", "attention_layers", "sd_timestep_embedding",
           "load_unet", "save_unet"]

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_ACTS = ("silu", "swish")

# Fields that must keep diffusers' default (or one of the listed values).
_UNET_DEFAULT_ONLY: Dict[str, Tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "dropout": (0, 0.0),
    "act_fn": _ACTS,
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),
}
# Read but without effect on float32 math (upcast_attention only changes fp16 precision);
# addition_embed_type_num_heads is unused without an addition embedding.
_UNET_NO_EFFECT = ("upcast_attention", "addition_embed_type_num_heads")


def _per_block(value: Any, n: int, name: str) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel config {name}={value!r} must have one entry per block ({n}).")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"UNet2DConditionModel config {name}={value!r}: nested per-layer lists are not supported.")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The diffusers ``UNet2DConditionModel`` config fields rljax implements (same names/defaults)."""

    sample_size: Optional[Union[int, Tuple[int, int]]] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Union[int, Tuple[int, ...]] = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Union[int, Tuple[int, ...]] = 1280
    transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    use_linear_projection: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: Optional[int] = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet2DConditionModel config: down_block_types, up_block_types and block_out_channels "
                             f"need one entry per block, got {self.down_block_types}, {self.up_block_types}, "
                             f"{self.block_out_channels}.")
        for t in self.down_block_types:
            if t not in _DOWN:
                raise ValueError(f"UNet2DConditionModel config down_block_types entry {t!r} is not supported "
                                 f"(supported: {_DOWN}).")
        for t in self.up_block_types:
            if t not in _UP:
                raise ValueError(f"UNet2DConditionModel config up_block_types entry {t!r} is not supported "
                                 f"(supported: {_UP}).")
        if self.norm_num_groups is None:
            raise ValueError("UNet2DConditionModel config norm_num_groups=None is not supported; set a group count.")
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
            object.__setattr__(self, name, _per_block(getattr(self, name), n, name)
                               if isinstance(getattr(self, name), (list, tuple)) else getattr(self, name))

    # per-block views
    def blocks(self, name: str) -> Tuple[Any, ...]:
        return _per_block(getattr(self, name), len(self.block_out_channels), name)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UNet2DConditionConfig":
        """From diffusers' ``unet/config.json``; a non-default unsupported field raises naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        check_config_fields("UNet2DConditionModel", d, names | set(_UNET_NO_EFFECT), _UNET_DEFAULT_ONLY)
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "UNet2DConditionModel", **d}


def sd_timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                          max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: ``[B] -> [B, dim]`` float32 sinusoids."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ---------------------------------------------------------------------------------------------
# Layers shared with the VAE (names as diffusers')
# ---------------------------------------------------------------------------------------------


def group_norm(groups: int, eps: float, name: str, dtype: Any = None) -> nn.GroupNorm:
    """torch ``GroupNorm`` numerics (two-pass variance)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: Optional[int] = None,
         dtype: Any = None) -> nn.Conv:
    """torch ``Conv2d(kernel, stride, padding=(kernel - 1) // 2)`` (symmetric padding)."""
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), dtype=dtype,
                   name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, scale 1): GroupNorm ->
    SiLU -> conv1 (+ ``time_emb_proj(silu(temb))``) -> GroupNorm -> SiLU -> conv2, plus the
    (1x1 ``conv_shortcut`` when channels change) residual. ``temb=None``: the VAE's variant."""

    out_channels: int
    groups: int
    eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = conv(self.out_channels, 3, "conv1", dtype=self.dtype)(
            nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x)))
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = conv(self.out_channels, 3, "conv2", dtype=self.dtype)(
            nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", dtype=self.dtype)(x)
        return x + h


def attention_layers(x: jax.Array, context: Optional[jax.Array], heads: int, dim_head: int, out_dim: int,
                     qkv_bias: bool = False, dtype: Any = None) -> jax.Array:
    """diffusers' ``Attention`` core, creating ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` in the
    calling compact module: softmax(q k^T / sqrt(dim_head)) v over ``heads``. ``x`` ``[B, N, C]``,
    ``context`` ``[B, M, D]`` (None: self-attention) -> ``[B, N, out_dim]``."""
    context = x if context is None else context
    inner = heads * dim_head

    def proj(name, t):
        y = nn.Dense(inner, use_bias=qkv_bias, dtype=dtype, name=name)(t)
        return y.reshape(y.shape[:2] + (heads, dim_head))

    q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim_head)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape[:2] + (inner,))
    return nn.Dense(out_dim, dtype=dtype, name="to_out_0")(out)


class Attention(nn.Module):
    """diffusers' ``Attention`` (see :func:`attention_layers`); ``to_q/to_k/to_v`` without bias."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        return attention_layers(x, context, self.heads, self.dim_head, self.out_dim, self.qkv_bias, self.dtype)


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """``proj`` to ``2 * inner``, then ``hidden * gelu(gate)`` (exact gelu)."""

    inner: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm, residuals."""

    dim: int
    heads: int
    dim_head: int
    eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def ln(name):
            return nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, dtype=self.dtype, name=name)

        x = x + Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv, or Linear with ``use_linear_projection``) -> transformer
    blocks over the ``H * W`` tokens -> proj_out -> residual."""

    heads: int
    dim_head: int
    num_layers: int
    groups: int
    use_linear_projection: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        h = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
        else:
            h = conv(inner, 1, "proj_in", dtype=self.dtype)(h).reshape(b, hh * ww, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(inner, self.heads, self.dim_head, dtype=self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
        else:
            h = conv(c, 1, "proj_out", dtype=self.dtype)(h.reshape(b, hh, ww, inner))
        return h + x


class _Sampler(nn.Module):
    """``Downsample2D`` (3x3 conv, stride 2) or ``Upsample2D`` (nearest 2x, 3x3 conv); holds ``conv``."""

    features: int
    up: bool
    padding: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return conv(self.features, 3, "conv", dtype=self.dtype)(x)
        return conv(self.features, 3, "conv", stride=2, padding=self.padding, dtype=self.dtype)(x)


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------


class _TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class _DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``with_attn``) / ``DownBlock2D``; returns ``(x, skips)``."""

    ch: int
    num_layers: int
    with_attn: bool
    downsample: bool
    make_transformer: Any
    groups: int
    eps: float
    padding: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x, temb, ctx):
        skips = []
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.ch, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(x, temb)
            if self.with_attn:
                x = self.make_transformer(name=f"attentions_{j}")(x, ctx)
            skips.append(x)
        if self.downsample:
            x = _Sampler(self.ch, False, self.padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class _UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: each resnet first concatenates the last skip."""

    ch: int
    num_layers: int
    with_attn: bool
    upsample: bool
    make_transformer: Any
    groups: int
    eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x, skips, temb, ctx):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = ResnetBlock2D(self.ch, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(x, temb)
            if self.with_attn:
                x = self.make_transformer(name=f"attentions_{j}")(x, ctx)
        if self.upsample:
            x = _Sampler(self.ch, True, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class _MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    ch: int
    make_transformer: Any
    groups: int
    eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x, temb, ctx):
        x = ResnetBlock2D(self.ch, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
        x = self.make_transformer(name="attentions_0")(x, ctx)
        return ResnetBlock2D(self.ch, self.groups, self.eps, self.dtype, name="resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
    """diffusers' ``UNet2DConditionModel`` forward (see the module docstring for shapes/config)."""

    config: UNet2DConditionConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        c = self.config
        chex.assert_rank([sample, encoder_hidden_states], [4, 3])
        b, n = sample.shape[0], len(c.block_out_channels)
        f = 2 ** (n - 1)
        if sample.shape[1] % f or sample.shape[2] % f:
            raise ValueError(f"sample height/width {sample.shape[1:3]} must be divisible by {f} (2 ** (blocks - 1)).")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        ctx = encoder_hidden_states
        groups, eps, dt = c.norm_num_groups, c.norm_eps, self.dtype
        heads, tlayers = c.blocks("attention_head_dim"), c.blocks("transformer_layers_per_block")
        layers = c.blocks("layers_per_block")

        def transformer(i, ch):
            return functools.partial(Transformer2DModel, heads[i], ch // heads[i], tlayers[i], groups,
                                     c.use_linear_projection, dt)

        emb = sd_timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = _TimestepEmbedding(c.time_embed_dim, dt, name="time_embedding")(emb)
        x = conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in", dtype=dt)(sample)
        skips = [x]
        for i, (kind, ch) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            x, s = _DownBlock(ch, layers[i], kind == "CrossAttnDownBlock2D", i < n - 1, transformer(i, ch), groups,
                              eps, c.downsample_padding, dt, name=f"down_blocks_{i}")(x, temb, ctx)
            skips += s
        ch = c.block_out_channels[-1]
        x = _MidBlock(ch, transformer(n - 1, ch), groups, eps, dt, name="mid_block")(x, temb, ctx)
        for i, kind in enumerate(c.up_block_types):
            bi = n - 1 - i  # the down block this one mirrors (per-block settings reversed, as diffusers)
            ch, k = c.block_out_channels[bi], layers[bi] + 1
            x = _UpBlock(ch, k, kind == "CrossAttnUpBlock2D", i < n - 1, transformer(bi, ch), groups, eps, dt,
                         name=f"up_blocks_{i}")(x, skips[len(skips) - k:], temb, ctx)
            skips = skips[:len(skips) - k]
        x = nn.silu(group_norm(groups, eps, "conv_norm_out", dt)(x))
        return conv(c.out_channels, c.conv_out_kernel, "conv_out", dtype=dt)(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def unet_param_shapes(module: UNet2DConditionModel, cross_dim: int) -> Any:
    """The params tree of ``module`` as ``jax.ShapeDtypeStruct`` s (no compute)."""
    c = module.config
    f = 2 ** (len(c.block_out_channels) - 1)
    x = jnp.zeros((1, f, f, c.in_channels))
    ctx = jnp.zeros((1, 1, cross_dim))
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), ctx))["params"]


def load_unet(folder: str, *, dtype: Any = None, param_dtype: Any = jnp.float32
              ) -> Tuple[UNet2DConditionModel, Any]:
    """``(module, params)`` from a diffusers ``unet/`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``)."""
    raw = read_json(folder, "config.json")
    config = UNet2DConditionConfig.from_dict(raw)
    module = UNet2DConditionModel(config, dtype=dtype)
    cross = config.blocks("cross_attention_dim")
    if len(set(cross)) != 1:
        raise ValueError(f"UNet2DConditionModel config cross_attention_dim={config.cross_attention_dim}: rljax needs "
                         "one value for all blocks.")
    template = unet_param_shapes(module, cross[0])
    sd = load_safetensors_folder(folder)
    params = torch_state_dict_to_params(sd, template, what=f"unet ({os.path.basename(folder.rstrip('/'))})",
                                        dtype=param_dtype)
    return module, params


def save_unet(folder: str, module: UNet2DConditionModel, params: Any) -> None:
    """diffusers' ``unet/`` folder: ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
    save_safetensors_folder(folder, params, module.config.to_dict(), weights_name=DIFFUSERS_WEIGHTS)


def cross_attention_dim(config: UNet2DConditionConfig) -> int:
    return int(config.blocks("cross_attention_dim")[0])

