"""Diffusion models for DDPO: DDIM schedules, a tiny conditional pixel-space denoiser and the
pipeline protocol the DDPO trainer drives (TRL: ``trl/models/modeling_sd_base.py``)."""
from rljax.diffusion.schedulers import DDIMSchedule, DDIMSchedulerConfig, add_noise, ddim_timesteps, make_ddim_schedule

__all__ = ["DDIMSchedule", "DDIMSchedulerConfig", "add_noise", "ddim_timesteps", "make_ddim_schedule"]
