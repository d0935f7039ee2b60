"""rljax: TRL 0.7.11 rebuilt as pure, jitted JAX/Flax functions.

Trainer shells are imported lazily so `import rljax` stays light.
"""
from __future__ import annotations

import importlib

from rljax.trainers import _LAZY as _TRAINERS_LAZY

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it (the TRL-compatible shells: rljax.trainers's table)
    **_TRAINERS_LAZY,
    "PPOConfig": "rljax.ppo",
    "AutoModelForCausalLMWithValueHead": "rljax.models.auto",
    "AutoModelForCausalLM": "rljax.models.auto",
    "AutoModelForSequenceClassification": "rljax.models.auto",
    "AutoModelForSeq2SeqLM": "rljax.models.auto",
    "AutoModelForSeq2SeqLMWithValueHead": "rljax.models.auto",
    "respond_to_batch": "rljax.generation",
    "LengthSampler": "rljax.core",
    "TextEnvironment": "rljax.environment",
    "TextHistory": "rljax.environment",
    "setup_chat_format": "rljax.models.chat",
    "DefaultDDPOStableDiffusionPipeline": "rljax.diffusion.sd_pipeline",
    "LoraConfig": "rljax.models.peft",
    "PeftModel": "rljax.models.peft",
    "TaskType": "rljax.models.peft",
    "get_peft_model": "rljax.models.peft",
}
_LAZY.pop("Trainer")  # the base loop stays at rljax.trainers.Trainer (trl exports no Trainer)

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rljax' has no attribute {name!r}")
