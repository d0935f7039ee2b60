"""TRL-compatible shells (TRL: ``trl/trainer/``): they own I/O, batching, logging, files and
validation, and call the pure functions of the flat ``rljax.*`` modules for every number.

Shells are imported lazily so that ``import rljax.trainers`` stays light.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "TrainingArguments": "rljax.trainers.base",
    "Trainer": "rljax.trainers.base",
    "PPOTrainer": "rljax.trainers.ppo",
    "create_reference_model": "rljax.trainers.ppo",
    "SFTConfig": "rljax.trainers.sft",
    "SFTTrainer": "rljax.trainers.sft",
    "RewardConfig": "rljax.trainers.reward",
    "RewardTrainer": "rljax.trainers.reward",
    "DPOConfig": "rljax.trainers.dpo",
    "DPOTrainer": "rljax.trainers.dpo",
    "IterativeSFTTrainer": "rljax.trainers.iterative_sft",
    "BestOfNSampler": "rljax.trainers.best_of_n",
    "DDPOConfig": "rljax.trainers.ddpo",
    "DDPOTrainer": "rljax.trainers.ddpo",
    "GRPOConfig": "rljax.trainers.grpo",
    "GRPOTrainer": "rljax.trainers.grpo",
    "RLOOConfig": "rljax.trainers.rloo",
    "RLOOTrainer": "rljax.trainers.rloo",
    "set_seed": "rljax.trainers.seeding",
    "ModelConfig": "rljax.trainers.model_config",
    "get_peft_config": "rljax.trainers.model_config",
    "get_quantization_config": "rljax.trainers.model_config",
    "get_kbit_device_map": "rljax.trainers.model_config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rljax.trainers' has no attribute {name!r}")
