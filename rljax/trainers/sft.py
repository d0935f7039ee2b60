"""Supervised fine-tuning: TRL 0.7.11's SFTTrainer over a pure, jitted train step.

The loss is masked next-token cross-entropy (``rljax.losses.sft_loss``); the shell
tokenizes (or packs) the dataset, pads to bucketed static lengths and runs
``rljax.trainers.base.Trainer``'s loop.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, Optional

import numpy as np

from rljax import data as D
from rljax.sft import make_sft_loss
from rljax.trainers.base import (
    Trainer,
    TrainingArguments,
    apply_overrides,
    resolve_model,
)


@dataclasses.dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus SFTTrainer's own options (TRL 0.7.11 names and defaults)."""

    dataset_text_field: Optional[str] = None
    packing: bool = False
    max_seq_length: Optional[int] = None
    num_of_sequences: int = 1024
    chars_per_token: float = 3.6
    dataset_batch_size: int = 1000
    neftune_noise_alpha: Optional[float] = None
    append_concat_token: bool = True
    add_special_tokens: bool = True
    pad_to_multiple_of: int = 32  # rljax: bucketed padding, so jit compiles few shapes


class SFTTrainer(Trainer):
    """TRL's SFTTrainer: ``SFTTrainer(model, args, train_dataset=..., dataset_text_field=..., ...)``.

    ``model``: checkpoint path, ``(module, params)``, or an object with ``.module``/``.params``.
    Options TRL takes as keyword arguments (dataset_text_field, packing, max_seq_length,
    neftune_noise_alpha, ...) may be given here or on ``SFTConfig``; keywords win.
    """

    def __init__(
        self,
        model: Any = None,
        args: Optional[SFTConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        formatting_func: Optional[Callable] = None,
        params: Any = None,
        mesh: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SFTConfig()
        if not isinstance(args, SFTConfig):
            args = SFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)})
        args = apply_overrides(args, kwargs, "SFTTrainer")
        if model is None:
            raise ValueError("SFTTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        if tokenizer is None:
            if not isinstance(model, str):
                raise ValueError("SFTTrainer needs a tokenizer when the model is not a checkpoint path.")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        if tokenizer.pad_token_id is None:  # TRL: silently pad with eos
            D.ensure_pad_token(tokenizer, set_to_eos=True)
        module, params = resolve_model(model, params)
        super().__init__(module, params, args, None, None, mesh=mesh)
        self.tokenizer = tokenizer
        if args.max_seq_length is None:
            args.max_seq_length = min(getattr(tokenizer, "model_max_length", 1024) or 1024, 1024)
            warnings.warn(f"max_seq_length not set; using {args.max_seq_length} (TRL's default).")
        if args.packing and isinstance(data_collator, D.DataCollatorForCompletionOnlyLM):
            raise ValueError("packing=True cannot be combined with DataCollatorForCompletionOnlyLM; set packing=False.")
        if args.neftune_noise_alpha is not None and args.neftune_noise_alpha < 0:
            raise ValueError(f"neftune_noise_alpha must be >= 0, got {args.neftune_noise_alpha}.")
        self.formatting_func = formatting_func
        self.train_dataset = self._prepare(train_dataset, formatting_func) if train_dataset is not None else None
        self.eval_dataset = self._prepare(eval_dataset, formatting_func) if eval_dataset is not None else None
        self.data_collator = data_collator
        self.loss_fn = make_sft_loss(module, args.neftune_noise_alpha)

    def _prepare(self, dataset: Any, formatting_func: Optional[Callable]):
        a = self.args
        if a.packing:
            if a.dataset_text_field is None and formatting_func is None:
                raise ValueError("packing=True needs dataset_text_field or formatting_func.")
            packed = D.pack_sequences(
                dataset, self.tokenizer, a.max_seq_length, dataset_text_field=a.dataset_text_field,
                formatting_func=formatting_func, num_of_sequences=a.num_of_sequences, chars_per_token=a.chars_per_token,
                append_concat_token=a.append_concat_token, add_special_tokens=a.add_special_tokens, seed=a.seed,
            )
            return [{"input_ids": x, "labels": y} for x, y in zip(packed["input_ids"], packed["labels"])]
        return D.tokenize_sft_dataset(
            dataset, self.tokenizer, dataset_text_field=a.dataset_text_field, formatting_func=formatting_func,
            max_seq_length=a.max_seq_length, add_special_tokens=a.add_special_tokens,
            dataset_batch_size=a.dataset_batch_size,
        )

    def collate(self, examples) -> Dict[str, np.ndarray]:
        if self.data_collator is not None:
            return self.data_collator(examples)
        if self.args.packing:
            ids = np.stack([np.asarray(e["input_ids"], np.int32) for e in examples])
            return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.stack([np.asarray(e["labels"], np.int32) for e in examples])}
        return D.collate_lm(
            examples, self.tokenizer.pad_token_id, max_length=self.args.max_seq_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
        )

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Eval loss (token-weighted within a batch) and perplexity = exp(eval_loss)."""
        ds = self._prepare(eval_dataset, self.formatting_func) if eval_dataset is not None else None
        out = super().evaluate(ds, metric_key_prefix)
        out[f"{metric_key_prefix}_perplexity"] = float(np.exp(out[f"{metric_key_prefix}_loss"]))
        return out

    def _save(self, output_dir: str) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.model, self.params, output_dir, overwrite=True)
        self.tokenizer.save_pretrained(output_dir)
