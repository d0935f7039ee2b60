"""``ModelConfig`` and its helpers (TRL: ``trl/trainer/model_config.py`` and the three
``get_*`` functions of ``trl/trainer/utils.py``): what TRL's example scripts parse with
``HfArgumentParser`` to decide which model to load and how.

Fields and defaults are TRL 0.7.11's. The helpers return what a script passes on to
``from_pretrained`` / a trainer:

- ``get_peft_config(model_config)``: ``None`` without ``use_peft``; rljax has no LoRA / PEFT
  adapters yet, so ``use_peft=True`` raises ``NotImplementedError`` instead of training the
  full model behind the user's back.
- ``get_quantization_config(model_config)``: ``None`` unless ``load_in_8bit`` /
  ``load_in_4bit``; rljax has no bitsandbytes quantization, so those raise
  ``NotImplementedError``.
- ``get_kbit_device_map()``: always ``None``. JAX places arrays with meshes and shardings
  (``rljax.sharding``, every trainer's ``mesh=``), not with a ``device_map``; TRL also returns
  ``None`` without a GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["ModelConfig", "get_peft_config", "get_quantization_config", "get_kbit_device_map"]

TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")

_PEFT_MESSAGE = (
    "use_peft=True: rljax does not support PEFT / LoRA adapters yet (planned as rljax.models.peft, a separate "
    "issue). Train the full model: drop --use_peft (and the --lora_* options)."
)
_QUANT_MESSAGE = (
    "{flag}=True: rljax does not support bitsandbytes {bits}-bit loading. Load the model in a smaller float "
    "dtype instead (--torch_dtype bfloat16) and drop --{flag}."
)


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


def get_peft_config(model_config: ModelConfig) -> None:
    """TRL builds a ``LoraConfig`` from the ``lora_*`` fields when ``use_peft``; rljax returns
    ``None`` without ``use_peft`` and raises ``NotImplementedError`` with it (no adapters yet)."""
    if model_config.use_peft:
        raise NotImplementedError(_PEFT_MESSAGE)
    return None


def get_quantization_config(model_config: ModelConfig) -> None:
    """``None`` unless ``load_in_8bit`` / ``load_in_4bit`` ask for bitsandbytes quantization,
    which rljax does not have (``NotImplementedError`` naming the flag)."""
    if model_config.load_in_4bit:
        raise NotImplementedError(_QUANT_MESSAGE.format(flag="load_in_4bit", bits=4))
    if model_config.load_in_8bit:
        raise NotImplementedError(_QUANT_MESSAGE.format(flag="load_in_8bit", bits=8))
    return None


def get_kbit_device_map() -> None:
    """Always ``None``: JAX places arrays with meshes (``mesh=`` on every trainer), not device maps."""
    return None
