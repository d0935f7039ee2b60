"""The decode path of diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) in Flax, loading
diffusers checkpoints (names one-to-one, ``rljax.diffusion.sd_io``).

``decode(z)``: ``post_quant_conv`` (1x1) then the ``Decoder``: ``conv_in``, mid block (resnet,
single-head spatial self-attention with GroupNorm, resnet), ``up_blocks`` (``UpDecoderBlock2D``:
``layers_per_block + 1`` resnets, nearest 2x upsample + conv except the last), GroupNorm, SiLU,
``conv_out``. Channels-last: ``z`` ``[B, h, w, latent_channels]`` -> ``[B, h * 2**(n-1),
w * 2**(n-1), out_channels]`` in about ``[-1, 1]``. The encoder is not implemented (DDPO only
decodes); its tensors in a checkpoint are skipped on load.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

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
from rljax.diffusion.sd_unet import (
    ResnetBlock2D,
    _Sampler,
    attention_layers,
    conv,
    group_norm,
)

__all__ = ["AutoencoderKLConfig", "AutoencoderKLDecoder", "load_vae_decoder", "save_vae_decoder"]

_VAE_DEFAULT_ONLY: Dict[str, Tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "shift_factor": (None, 0, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
}
# Read and kept for saving, without effect on decoding (encoder side; fp16 only; informational).
_VAE_NO_EFFECT = ("sample_size", "in_channels", "down_block_types", "use_quant_conv", "force_upcast")
# Pre-0.14 diffusers names of the mid-block attention.
_LEGACY_RENAMES = ((r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
                   (r"\.proj_attn\.", ".to_out.0."))
_ENCODER_KEYS = (r"^encoder\.", r"^quant_conv\.")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The diffusers ``AutoencoderKL`` config fields the decoder reads (same names and defaults)."""

    out_channels: int = 3
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        bad = [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"AutoencoderKL config up_block_types entry {bad[0]!r} is not supported "
                             "(supported: 'UpDecoderBlock2D').")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(f"AutoencoderKL config: up_block_types {self.up_block_types} and block_out_channels "
                             f"{self.block_out_channels} need the same length.")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AutoencoderKLConfig":
        """From diffusers' ``vae/config.json``; an unsupported non-default field raises naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        raw = {k: d.pop(k) for k in _VAE_NO_EFFECT if k in d}
        check_config_fields("AutoencoderKL", d, names, _VAE_DEFAULT_ONLY)
        cfg = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})
        object.__setattr__(cfg, "_raw_encoder_fields", raw)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        extra = getattr(self, "_raw_encoder_fields", {})
        return {"_class_name": "AutoencoderKL", **extra, **d}


class _MidBlock2D(nn.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, spatial self-attention, resnet."""

    ch: int
    groups: int
    add_attention: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.ch, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = _SpatialAttention(self.ch, self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.ch, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class _SpatialAttention(nn.Module):
    """diffusers' VAE ``Attention``: ``group_norm``, one head of width ``ch`` (q/k/v with bias),
    ``to_out.0``, residual."""

    ch: int
    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = group_norm(self.groups, 1e-6, "group_norm", self.dtype)(x).reshape(b, h * w, c)
        y = attention_layers(t, None, 1, c, c, qkv_bias=True, dtype=self.dtype)
        return x + y.reshape(b, h, w, c)


class _UpDecoderBlock2D(nn.Module):
    ch: int
    num_layers: int
    upsample: bool
    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.ch, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = _Sampler(self.ch, True, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class _Decoder(nn.Module):
    config: AutoencoderKLConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, z):
        c, dt = self.config, self.dtype
        rev = tuple(reversed(c.block_out_channels))
        x = conv(rev[0], 3, "conv_in", dtype=dt)(z)
        x = _MidBlock2D(rev[0], c.norm_num_groups, c.mid_block_add_attention, dt, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = _UpDecoderBlock2D(ch, c.layers_per_block + 1, i < len(rev) - 1, c.norm_num_groups, dt,
                                  name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(c.norm_num_groups, 1e-6, "conv_norm_out", dt)(x))
        return conv(c.out_channels, 3, "conv_out", dtype=dt)(x)


class AutoencoderKLDecoder(nn.Module):
    """``AutoencoderKL.decode`` (params ``post_quant_conv`` and ``decoder``, diffusers' names).

    ``z`` ``[B, h, w, latent_channels]`` (already divided by ``scaling_factor``) -> images
    ``[B, H, W, out_channels]`` float32 in about ``[-1, 1]``."""

    config: AutoencoderKLConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chex.assert_rank(z, 4)
        if self.config.use_post_quant_conv:
            z = conv(self.config.latent_channels, 1, "post_quant_conv", dtype=self.dtype)(z)
        return _Decoder(self.config, self.dtype, name="decoder")(z).astype(jnp.float32)


def load_vae_decoder(folder: str, *, dtype: Any = None, param_dtype: Any = jnp.float32
                     ) -> Tuple[AutoencoderKLDecoder, Any]:
    """``(module, params)`` from a diffusers ``vae/`` folder; encoder tensors are skipped and
    pre-0.14 attention names (``query``/``key``/``value``/``proj_attn``) are renamed."""
    config = AutoencoderKLConfig.from_dict(read_json(folder, "config.json"))
    module = AutoencoderKLDecoder(config, dtype=dtype)
    z = jnp.zeros((1, 1, 1, config.latent_channels))
    template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), z))["params"]
    params = torch_state_dict_to_params(load_safetensors_folder(folder), template,
                                        what=f"vae ({os.path.basename(folder.rstrip('/'))})",
                                        ignore=_ENCODER_KEYS, rename=_LEGACY_RENAMES, dtype=param_dtype)
    return module, params


def save_vae_decoder(folder: str, module: AutoencoderKLDecoder, params: Any,
                     encoder_state_dict: Optional[Dict[str, Any]] = None) -> None:
    """diffusers' ``vae/`` folder. Without ``encoder_state_dict`` (the original checkpoint's
    ``encoder.*`` / ``quant_conv.*`` tensors) the folder holds the decoder only, which rljax
    reads back but diffusers' full ``AutoencoderKL`` does not."""
    save_safetensors_folder(folder, params, module.config.to_dict(), weights_name=DIFFUSERS_WEIGHTS,
                            extra=encoder_state_dict)
