"""Flax causal LMs with HF-compatible parameter names, heads over them, and HF checkpoint I/O."""
from rljax.models.attention import CausalLMOutput, init_cache
from rljax.models.auto import (
    AutoModelForCausalLM,
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLM,
    AutoModelForSeq2SeqLMWithValueHead,
    AutoModelForSequenceClassification,
    GenerationConfig,
    ValueHeadModelOutput,
)
from rljax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from rljax.models.heads import (
    CausalLMWithValueHead,
    CausalLMWithValueHeadOutput,
    SequenceScoreModel,
    SequenceScoreOutput,
    ValueHead,
    lm_params,
    save_value_head_model,
    sequence_score_from_pretrained,
    value_head_model_from_pretrained,
)
from rljax.models.hub import (
    abstract_params,
    as_jax_dtype,
    config_from_dict,
    from_pretrained,
    init_params,
    model_from_config,
    save_pretrained,
)
from rljax.models.llama import LlamaConfig, LlamaForCausalLM
from rljax.models.peft import LoraConfig, PeftModel, TaskType, get_peft_model
from rljax.models.quant import dequantize_params, quantize_params
from rljax.models.t5 import T5Config, T5ForConditionalGeneration

__all__ = [
    "CausalLMOutput",
    "init_cache",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "AutoModelForCausalLM",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSeq2SeqLMWithValueHead",
    "T5Config",
    "T5ForConditionalGeneration",
    "AutoModelForSequenceClassification",
    "GenerationConfig",
    "ValueHeadModelOutput",
    "CausalLMWithValueHead",
    "CausalLMWithValueHeadOutput",
    "SequenceScoreModel",
    "SequenceScoreOutput",
    "ValueHead",
    "lm_params",
    "save_value_head_model",
    "sequence_score_from_pretrained",
    "value_head_model_from_pretrained",
    "abstract_params",
    "as_jax_dtype",
    "config_from_dict",
    "from_pretrained",
    "init_params",
    "model_from_config",
    "save_pretrained",
    "LoraConfig",
    "PeftModel",
    "TaskType",
    "get_peft_model",
    "quantize_params",
    "dequantize_params",
]
