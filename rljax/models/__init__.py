"""Flax causal LMs with HF-compatible parameter names, and HF checkpoint I/O."""
from rljax.models.attention import CausalLMOutput, init_cache
from rljax.models.hub import (
    abstract_params,
    config_from_dict,
    from_pretrained,
    init_params,
    model_from_config,
    save_pretrained,
)

__all__ = [
    "CausalLMOutput",
    "init_cache",
    "abstract_params",
    "config_from_dict",
    "from_pretrained",
    "init_params",
    "model_from_config",
    "save_pretrained",
]
