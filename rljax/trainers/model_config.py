"""``ModelConfig`` and its helpers (TRL: ``trl/trainer/model_config.py`` and the three
``get_*`` functions of ``trl/trainer/utils.py``): what TRL's example scripts parse with
``HfArgumentParser`` to decide which model to load and how.

Fields and defaults are TRL 0.7.11's. The helpers return what a script passes on to
``from_pretrained`` / a trainer:

- ``get_peft_config(model_config)``: ``None`` without ``use_peft``, else an
  ``rljax.models.peft.LoraConfig`` from the ``lora_*`` fields (task CAUSAL_LM, bias "none"),
  as TRL builds PEFT's.
- ``get_quantization_config(model_config)``: ``None`` unless ``load_in_8bit`` /
  ``load_in_4bit``; then a :class:`BitsAndBytesConfig` (the fields TRL sets) that
  ``from_pretrained(..., quantization_config=...)`` turns into rljax's int8 / NF4 weight-only
  quantization of the frozen base (``rljax.models.quant``; fp4 and nested quantization refused).
- ``get_kbit_device_map()``: always ``None``. JAX places arrays with meshes and shardings
  (``rljax.sharding``, every trainer's ``mesh=``), not with a ``device_map``; TRL also returns
  ``None`` without a GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["ModelConfig", "BitsAndBytesConfig", "get_peft_config", "get_quantization_config", "get_kbit_device_map"]

TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")



@dataclass
class BitsAndBytesConfig:
    """transformers' ``BitsAndBytesConfig`` fields TRL sets; ``quantization`` names rljax's
    scheme ("int8" or "nf4", see ``rljax.models.quant``)."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Any = None

    def __post_init__(self) -> None:
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError("BitsAndBytesConfig: set exactly one of load_in_8bit and load_in_4bit.")
        if self.load_in_4bit and self.bnb_4bit_quant_type != "nf4":
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}: rljax implements 'nf4' only.")
        if self.bnb_4bit_use_double_quant:
            raise ValueError("bnb_4bit_use_double_quant=True (nested quantization) is not implemented by rljax; pass False.")

    @property
    def quantization(self) -> str:
        return "int8" if self.load_in_8bit else "nf4"


@dataclass
class ModelConfig:
    """Which model and tokenizer a script loads, and how (TRL 0.7.11's fields and defaults)."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint (local HF directory or hub id) whose weights start training."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) to load; local directories ignore it."}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "Dtype to load the weights in (rljax maps it to the JAX dtype); 'auto' keeps the checkpoint's.",
            "choices": list(TORCH_DTYPES),
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "Attention kernel (e.g. flash_attention_2 in transformers); rljax lets XLA choose."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full model."})
    lora_r: Optional[int] = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: Optional[int] = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: Optional[float] = field(default=0.05, metadata={"help": "Dropout on the LoRA inputs."})
    lora_target_modules: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules that get LoRA adapters (None: the library's default)."}
    )
    lora_modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained fully besides the adapters."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8-bit (LoRA only)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4-bit (LoRA only)."})
    bnb_4bit_quant_type: Optional[str] = field(default="nf4", metadata={"help": "4-bit quantization type: fp4 or nf4."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Quantize the quantization constants too."})

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit cannot both be True: choose one precision.")
        if self.torch_dtype is not None and self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}: choose one of {list(TORCH_DTYPES)} or None.")

    def to_dict(self) -> Dict[str, Any]:
        """Fields as a flat dict (nested dicts joined with '/', as TRL's ``flatten_dict``)."""
        out: Dict[str, Any] = {}

        def put(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    put(f"{prefix}/{k}", v)
            else:
                out[prefix] = value

        for f in dataclasses.fields(self):
            put(f.name, getattr(self, f.name))
        return out


def get_peft_config(model_config: ModelConfig):
    """TRL's helper: ``None`` without ``use_peft``, else a LoraConfig from the ``lora_*`` fields."""
    if not model_config.use_peft:
        return None
    from rljax.models.peft import LoraConfig

    return LoraConfig(
        r=model_config.lora_r, lora_alpha=model_config.lora_alpha, lora_dropout=model_config.lora_dropout,
        bias="none", task_type="CAUSAL_LM", target_modules=model_config.lora_target_modules,
        modules_to_save=model_config.lora_modules_to_save,
    )


def get_quantization_config(model_config: ModelConfig) -> Optional[BitsAndBytesConfig]:
    """TRL's helper: ``None`` unless ``load_in_8bit`` / ``load_in_4bit``, else a BitsAndBytesConfig."""
    if model_config.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_config.bnb_4bit_quant_type or "nf4",
                                  bnb_4bit_use_double_quant=model_config.use_bnb_nested_quant)
    if model_config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def get_kbit_device_map() -> None:
    """Always ``None``: JAX places arrays with meshes (``mesh=`` on every trainer), not device maps."""
    return None
