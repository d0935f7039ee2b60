"""The pipeline protocol the DDPO trainer drives (TRL's ``DDPOStableDiffusionPipeline``) and the
embedded default, :class:`TinyDDPOPipeline` (pixel space, word-level prompts, offline).

A pipeline gives the trainer pure functions and arrays; the trainer owns the jitted loops:

- ``unet_apply(params, latents [B, *latent_shape], timesteps [B], embeds [B, L, D], frozen_params=None)
  -> noise_pred`` (pure; ``params`` are the trainable params),
- ``frozen_params``: a pytree of the frozen weights ``unet_apply`` / ``decode_latents`` use (a LoRA
  base U-Net, a VAE; ``{}`` if none). The trainer passes it into its jitted sampler, decoder and
  training step as an argument, so large frozen weights never become constants of the compiled
  programs (with ``frozen_params=None`` the pipeline uses its own: host-side convenience only),
- ``encode_prompts(prompts) -> [B, L, D]`` and ``tokenizer`` (``__call__`` -> ids, ``batch_decode``),
- ``decode_latents(latents, frozen_params=None) -> images [B, H, W, C]`` in ``[0, 1]`` (pure),
- ``params`` / ``set_params``, ``latent_shape``, ``scheduler_config``, ``use_lora``,
- ``save_pretrained(dir)``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.diffusion.denoiser import TinyConditionalUNet, TinyTextEncoder, WordTokenizer
from rljax.diffusion.schedulers import DDIMSchedulerConfig

__all__ = ["DDPOPipeline", "TinyPipelineConfig", "TinyDDPOPipeline", "DIGIT_WORDS"]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@runtime_checkable
class DDPOPipeline(Protocol):
    """What :class:`rljax.trainers.ddpo.DDPOTrainer` needs from a diffusion pipeline."""

    latent_shape: Tuple[int, ...]
    scheduler_config: DDIMSchedulerConfig
    use_lora: bool
    tokenizer: Any

    @property
    def params(self) -> Any: ...

    def set_params(self, params: Any) -> None: ...

    @property
    def frozen_params(self) -> Any: ...

    def unet_apply(self, params: Any, latents: jax.Array, timesteps: jax.Array, embeds: jax.Array,
                   frozen_params: Any = None) -> jax.Array: ...

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array: ...

    def decode_latents(self, latents: jax.Array, frozen_params: Any = None) -> jax.Array: ...

    def save_pretrained(self, output_dir: str) -> None: ...


@dataclasses.dataclass
class TinyPipelineConfig:
    """Sizes of the tiny pipeline. ``words``: the prompt vocabulary (default: digit names and a
    few filler words, so prompts like ``"a seven"`` work)."""

    image_size: int = 16
    channels: int = 1
    features: Tuple[int, int] = (32, 64)
    time_dim: int = 64
    embed_dim: int = 32
    model_max_length: int = 4
    words: Tuple[str, ...] = tuple(DIGIT_WORDS) + ("a", "digit", "the", "number")
    scheduler: Dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True, "steps_offset": 1,
        "set_alpha_to_one": False})

    def __post_init__(self):
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (one 2x downsampling), got {self.image_size}.")
        if any(f % 8 for f in self.features):
            raise ValueError(f"features must be multiples of 8 (GroupNorm(8)), got {self.features}.")


class TinyDDPOPipeline:
    """Pixel-space text-to-image pipeline (the embedded default for DDPO).

    Latents are the images themselves in ``[-1, 1]`` (``[B, S, S, C]``); ``decode_latents`` maps
    them to ``[0, 1]``. The text encoder is frozen (used only by ``encode_prompts``, a host call
    that passes its params to a jitted encoder); the U-Net params train (``use_lora`` is not
    supported here: the model is small enough to train whole). ``frozen_params`` is ``{}``.
    """

    def __init__(self, config: Optional[TinyPipelineConfig] = None, *, seed: int = 0, params: Any = None,
                 text_params: Any = None, use_lora: bool = False):
        if use_lora:
            raise ValueError("TinyDDPOPipeline trains the whole U-Net; pass use_lora=False.")
        self.config = config or TinyPipelineConfig()
        c = self.config
        self.use_lora = False
        self.latent_shape = (c.image_size, c.image_size, c.channels)
        self.scheduler_config = DDIMSchedulerConfig.from_dict(c.scheduler)
        self.tokenizer = WordTokenizer(c.words, c.model_max_length)
        self.unet = TinyConditionalUNet(out_channels=c.channels, features=tuple(c.features), time_dim=c.time_dim)
        self.text_encoder = TinyTextEncoder(len(self.tokenizer), c.model_max_length, c.embed_dim)
        k_unet, k_text = jax.random.split(jax.random.PRNGKey(seed))
        ids = jnp.zeros((1, c.model_max_length), jnp.int32)
        self.text_params = text_params if text_params is not None else self.text_encoder.init(k_text, ids)["params"]
        if params is None:
            x = jnp.zeros((1, *self.latent_shape))
            ctx = jnp.zeros((1, c.model_max_length, c.embed_dim))
            params = self.unet.init(k_unet, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
        self._params = params
        self._encode = jax.jit(lambda p, i: self.text_encoder.apply({"params": p}, i))

    # -- the protocol ------------------------------------------------------------------
    @property
    def params(self) -> Any:
        return self._params

    def set_params(self, params: Any) -> None:
        self._params = params

    @property
    def frozen_params(self) -> Any:
        """Nothing frozen enters ``unet_apply`` / ``decode_latents`` here: ``{}``."""
        return {}

    def unet_apply(self, params: Any, latents: jax.Array, timesteps: jax.Array, embeds: jax.Array,
                   frozen_params: Any = None) -> jax.Array:
        return self.unet.apply({"params": params}, latents, timesteps, embeds)

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """``[B, model_max_length, embed_dim]`` float32 (host call; jitted encoder)."""
        return self._encode(self.text_params, jnp.asarray(self.tokenizer(list(prompts))))

    def decode_latents(self, latents: jax.Array, frozen_params: Any = None) -> jax.Array:
        return jnp.clip(latents / 2 + 0.5, 0.0, 1.0)

    # -- files -------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str) -> None:
        """``config.json``, ``unet.safetensors`` and ``text_encoder.safetensors`` (flattened
        Flax names joined with '/')."""
        from safetensors.numpy import save_file

        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
        for name, tree in (("unet", self._params), ("text_encoder", self.text_params)):
            flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}
            save_file(flat, os.path.join(output_dir, f"{name}.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str) -> "TinyDDPOPipeline":
        from safetensors.numpy import load_file

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["features"], cfg["words"] = tuple(cfg["features"]), tuple(cfg["words"])
        trees = []
        for name in ("unet", "text_encoder"):
            flat = load_file(os.path.join(path, f"{name}.safetensors"))
            trees.append(unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()}))
        return cls(TinyPipelineConfig(**cfg), params=trees[0], text_params=trees[1])
