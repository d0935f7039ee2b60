"""DDIM noise schedule as a pytree (diffusers' ``DDIMScheduler``, the scheduler TRL's DDPO uses).

``DDIMSchedulerConfig`` carries diffusers' ``scheduler_config.json`` fields (same names and
defaults); :func:`make_ddim_schedule` turns it plus a number of inference steps into a
:class:`DDIMSchedule` (``alphas_cumprod`` and the inference ``timesteps`` as arrays, the rest
static), which the jitted sampler and :func:`rljax.ddpo.ddim_step_with_logprob` take as an
argument. The numbers follow diffusers: betas and ``alphas_cumprod`` in float32, timestep
spacing ``leading`` / ``trailing`` / ``linspace``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DDIMSchedulerConfig", "DDIMSchedule", "make_ddim_schedule", "ddim_timesteps", "add_noise"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclasses.dataclass
class DDIMSchedulerConfig:
    """diffusers' ``DDIMScheduler`` config (``scheduler_config.json``), same names and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}.")
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {self.timestep_spacing!r}.")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.thresholding:
            raise ValueError("thresholding=True (dynamic thresholding) is not supported; set thresholding=False.")
        if self.rescale_betas_zero_snr:
            raise ValueError(
                "rescale_betas_zero_snr=True is not supported (it makes the last DDPO step's variance zero); "
                "set rescale_betas_zero_snr=False."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DDIMSchedulerConfig":
        """From a diffusers scheduler config dict (any scheduler's: unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = "scheduler") -> "DDIMSchedulerConfig":
        """Read ``<path>/<subfolder>/scheduler_config.json`` (a local diffusers pipeline folder)."""
        folder = os.path.join(path, subfolder) if subfolder else path
        with open(os.path.join(folder, "scheduler_config.json")) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> Dict[str, Any]:
        return {"_class_name": "DDIMScheduler", **dataclasses.asdict(self)}

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


@flax.struct.dataclass
class DDIMSchedule:
    """A DDIM schedule for one number of inference steps (pass it to jitted functions).

    Attributes:
      alphas_cumprod: ``[num_train_timesteps]`` float32, cumulative product of ``1 - beta``.
      final_alpha_cumprod: ``[]`` float32 (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
      timesteps: ``[num_inference_steps]`` int32, descending (the sampler's order).
    """

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    timesteps: jax.Array
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    num_inference_steps: int = flax.struct.field(pytree_node=False, default=50)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=True)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)


def _betas(c: DDIMSchedulerConfig) -> np.ndarray:
    n = c.num_train_timesteps
    if c.beta_schedule == "linear":
        return np.linspace(c.beta_start, c.beta_end, n, dtype=np.float32)
    if c.beta_schedule == "scaled_linear":
        return (np.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=np.float32) ** 2).astype(np.float32)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)


def ddim_timesteps(config: DDIMSchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """diffusers' ``DDIMScheduler.set_timesteps``: ``[num_inference_steps]`` int, descending."""
    n, t = int(num_inference_steps), config.num_train_timesteps
    if not 1 <= n <= t:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={t}], got {n}.")
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, t - 1, n).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        steps = (np.arange(0, n) * (t // n)).round()[::-1].copy().astype(np.int64) + config.steps_offset
    else:  # trailing
        steps = np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1
    return steps


def make_ddim_schedule(config: Optional[DDIMSchedulerConfig] = None, num_inference_steps: int = 50) -> DDIMSchedule:
    """Build the :class:`DDIMSchedule` of ``config`` (default: diffusers' defaults) for
    ``num_inference_steps`` sampler steps."""
    config = config or DDIMSchedulerConfig()
    # float32 betas as diffusers; the product in float64 (within 4e-7 of torch's float32 cumprod)
    alphas_cumprod = np.cumprod((1.0 - _betas(config)).astype(np.float64)).astype(np.float32)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return DDIMSchedule(
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        timesteps=jnp.asarray(ddim_timesteps(config, num_inference_steps), jnp.int32),
        num_train_timesteps=config.num_train_timesteps,
        num_inference_steps=int(num_inference_steps),
        prediction_type=config.prediction_type,
        clip_sample=bool(config.clip_sample),
        clip_sample_range=float(config.clip_sample_range),
    )


def add_noise(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Forward diffusion ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (diffusers' ``add_noise``).

    ``x0``, ``noise``: ``[B, ...]``; ``timesteps``: ``[B]`` int in ``[0, num_train_timesteps)``.
    """
    a = schedule.alphas_cumprod[timesteps].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
