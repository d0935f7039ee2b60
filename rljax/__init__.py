"""rljax: TRL 0.7.11 rebuilt as pure, jitted JAX/Flax functions.

Trainer shells are imported lazily so `import rljax` stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "PPOConfig": "rljax.ppo",
    "PPOTrainer": "rljax.ppo_trainer",
    "AutoModelForCausalLMWithValueHead": "rljax.models.heads",
    "create_reference_model": "rljax.ppo_trainer",
    "respond_to_batch": "rljax.generation",
    "SFTConfig": "rljax.sft",
    "SFTTrainer": "rljax.sft",
    "RewardConfig": "rljax.reward",
    "RewardTrainer": "rljax.reward",
    "DPOConfig": "rljax.dpo",
    "DPOTrainer": "rljax.dpo",
    "IterativeSFTTrainer": "rljax.iterative_sft",
    "LengthSampler": "rljax.core",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rljax' has no attribute {name!r}")
