"""rljax: TRL 0.7.11 rebuilt as pure, jitted JAX/Flax functions.

Trainer shells are imported lazily so `import rljax` stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "PPOConfig": "rljax.ppo",
    "PPOTrainer": "rljax.trainers.ppo",
    "AutoModelForCausalLMWithValueHead": "rljax.models.auto",
    "AutoModelForCausalLM": "rljax.models.auto",
    "AutoModelForSequenceClassification": "rljax.models.auto",
    "create_reference_model": "rljax.trainers.ppo",
    "respond_to_batch": "rljax.generation",
    "SFTConfig": "rljax.trainers.sft",
    "SFTTrainer": "rljax.trainers.sft",
    "RewardConfig": "rljax.trainers.reward",
    "RewardTrainer": "rljax.trainers.reward",
    "DPOConfig": "rljax.trainers.dpo",
    "DPOTrainer": "rljax.trainers.dpo",
    "IterativeSFTTrainer": "rljax.trainers.iterative_sft",
    "LengthSampler": "rljax.core",
    "TrainingArguments": "rljax.trainers.base",
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
    raise AttributeError(f"module 'rljax' has no attribute {name!r}")
