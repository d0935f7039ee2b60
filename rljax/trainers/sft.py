"""Supervised fine-tuning: TRL 0.7.11's SFTTrainer over a pure, jitted train step.

The loss is masked next-token cross-entropy (``rljax.sft.make_sft_loss``, with NEFTune
noise when ``neftune_noise_alpha`` is set); the shell tokenizes (or packs) the datasets,
pads to bucketed static lengths and runs ``rljax.trainers.base.Trainer``'s loop.

Datasets (``train_dataset``, ``eval_dataset`` or a dict of named eval datasets):

* text rows with ``dataset_text_field`` or ``formatting_func`` (TRL's two ways), or a chat
  (``messages`` / ``conversations``) or instruction (``prompt``/``completion``) dataset,
  formatted through the tokenizer's chat template (TRL's automatic detection);
* ``packing=True`` packs the text into ``max_seq_length`` rows (TRL's ConstantLengthDataset);
* already tokenized or packed rows are used as they are: a
  :class:`rljax.data.ConstantLengthDataset`, the dict :func:`rljax.data.pack_sequences`
  returns, or rows holding ``input_ids`` (a list of dicts or a ``datasets.Dataset``) when
  neither ``dataset_text_field`` nor ``formatting_func`` is given. (TRL passes torch datasets
  through the same way, but raises for them with ``packing=False``.)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from rljax import data as D
from rljax.losses import sft_loss_and_count
from rljax.sft import make_sft_loss
from rljax.trainers.base import (
    EvalPrediction,
    Trainer,
    TrainingArguments,
    apply_overrides,
    apply_peft,
    resolve_model,
    resolve_tokenizer,
)


@dataclasses.dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus SFTTrainer's own options (TRL 0.7.11 names and defaults)."""

    dataset_text_field: Optional[str] = None
    """Text column to train on (or pass formatting_func)."""
    packing: bool = False
    """Pack texts into max_seq_length rows joined by eos (TRL's ConstantLengthDataset)."""
    max_seq_length: Optional[int] = None
    """Truncation / packed row length (None: min(tokenizer.model_max_length, 1024), with a warning)."""
    num_of_sequences: int = 1024
    """Packing buffer: rows' worth of characters tokenized at once."""
    chars_per_token: float = 3.6
    """Packing buffer: characters per token estimate."""
    dataset_batch_size: int = 1000
    """Rows per tokenizer call (<= 0: the whole dataset at once)."""
    dataset_num_proc: Optional[int] = None
    """Worker processes for tokenizing (datasets.map); None tokenizes in this process."""
    neftune_noise_alpha: Optional[float] = None
    """NEFTune: uniform noise alpha / sqrt(seq_len * hidden) on the input embeddings in training."""
    append_concat_token: bool = True
    """Packing: put eos between packed texts."""
    add_special_tokens: bool = True
    """Tokenize with the tokenizer's special tokens (e.g. BOS)."""
    pad_to_multiple_of: int = 32  # rljax: bucketed padding, so jit compiles few shapes
    """Pad batches to a multiple of this many tokens (capped at max_seq_length)."""


#: TRL's ``dataset_kwargs`` keys (forwarded to dataset preparation).
DATASET_KWARGS = ("append_concat_token", "add_special_tokens")

class PackedDataset(list):
    """Packed rows (``{"input_ids", "labels"}``, each ``[max_seq_length]``) the trainer trains
    on. ``infinite`` mirrors TRL's flag (True when ``max_steps > 0``): the loop cycles over the
    rows until ``max_steps`` either way."""

    infinite: bool = False


def _is_tokenized(dataset: Any) -> bool:
    """Rows that already hold ``input_ids`` (a dataset, a list of dicts, or pack_sequences' dict)."""
    if isinstance(dataset, D.ConstantLengthDataset):
        return True
    if isinstance(dataset, Mapping):
        return "input_ids" in dataset
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return "input_ids" in names
    if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], Mapping):
        return "input_ids" in dataset[0]
    return False


def _as_numpy(batch: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """A user collator's output (NumPy, JAX or torch tensors) as NumPy arrays."""
    out = {}
    for k, v in batch.items():
        if hasattr(v, "detach"):  # torch
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


class SFTTrainer(Trainer):
    """TRL's SFTTrainer: ``SFTTrainer(model, args, data_collator, train_dataset, eval_dataset,
    tokenizer, ..., dataset_text_field=..., packing=..., max_seq_length=..., ...)``.

    ``model``: checkpoint path (loaded with ``model_init_kwargs``), ``(module, params)``, a
    flax module with ``params=``, or an object with ``.module``/``.params``; or None with
    ``model_init`` (a callable returning one of those). The keyword arguments of TRL 0.7.11's
    signature are all accepted: SFT options (dataset_text_field, packing, max_seq_length,
    num_of_sequences, chars_per_token, dataset_num_proc, dataset_batch_size,
    neftune_noise_alpha, dataset_kwargs) may be given here or on :class:`SFTConfig`
    (keywords win); ``compute_metrics`` (with ``preprocess_logits_for_metrics``) gets the
    eval logits; ``callbacks`` and ``optimizers`` (an optax transformation / schedule) work as
    in :class:`rljax.trainers.base.Trainer`; ``infinite`` only warns (deprecated in TRL); a
    ``peft_config`` (a LoraConfig, rljax's or peft's): train LoRA adapters only (``rljax.models.peft``).
    Other :class:`SFTConfig` fields may be passed as keywords too. A model given as a path is
    loaded as ``rljax.models.AutoModelForCausalLM`` (``trainer.model``); the trained params are
    written back to a model object at the end of ``train()``.
    """

    _tag_names = ["trl", "sft"]

    def __init__(
        self,
        model: Any = None,
        args: Optional[TrainingArguments] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        model_init: Optional[Callable[[], Any]] = None,
        compute_metrics: Optional[Callable[[EvalPrediction], Dict[str, float]]] = None,
        callbacks: Optional[List[Any]] = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        peft_config: Any = None,
        dataset_text_field: Optional[str] = None,
        packing: Optional[bool] = None,
        formatting_func: Optional[Callable] = None,
        max_seq_length: Optional[int] = None,
        infinite: Optional[bool] = None,
        num_of_sequences: Optional[int] = None,
        chars_per_token: Optional[float] = None,
        dataset_num_proc: Optional[int] = None,
        dataset_batch_size: Optional[int] = None,
        neftune_noise_alpha: Optional[float] = None,
        model_init_kwargs: Optional[Dict[str, Any]] = None,
        dataset_kwargs: Optional[Dict[str, Any]] = None,
        *,
        params: Any = None,
        mesh: Any = None,
        **kwargs: Any,
    ):
        # -- arguments TRL takes that rljax rejects or only warns about ---------------------
        if preprocess_logits_for_metrics is not None and compute_metrics is None:
            raise ValueError("preprocess_logits_for_metrics only runs with compute_metrics; pass compute_metrics too.")
        if model_init_kwargs is not None and not isinstance(model, str):
            raise ValueError("You passed model_init_kwargs to the SFTTrainer. But your model is already instantiated.")
        if infinite is not None:
            warnings.warn(
                "The `infinite` argument is deprecated (as in TRL); use `max_steps` or `num_train_epochs` "
                "to control training length."
            )
        if dataset_kwargs:
            unknown = sorted(set(dataset_kwargs) - set(DATASET_KWARGS))
            if unknown:
                raise ValueError(f"dataset_kwargs got unknown keys {unknown}; supported: {list(DATASET_KWARGS)}.")
            kwargs.update(dataset_kwargs)

        # -- configuration ------------------------------------------------------------------
        args = args if args is not None else SFTConfig()
        if not isinstance(args, SFTConfig):
            base = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if hasattr(args, f.name)}
            extra = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig)
                     if f.name not in base and hasattr(args, f.name)}
            args = SFTConfig(**base, **extra)
        given = dict(
            dataset_text_field=dataset_text_field, packing=packing, max_seq_length=max_seq_length,
            num_of_sequences=num_of_sequences, chars_per_token=chars_per_token, dataset_num_proc=dataset_num_proc,
            dataset_batch_size=dataset_batch_size, neftune_noise_alpha=neftune_noise_alpha,
        )
        args = apply_overrides(args, {**given, **kwargs}, "SFTTrainer")
        if args.neftune_noise_alpha is not None and args.neftune_noise_alpha < 0:
            raise ValueError(f"neftune_noise_alpha must be >= 0, got {args.neftune_noise_alpha}.")
        if args.max_seq_length is not None and args.max_seq_length < 2:
            raise ValueError(
                f"max_seq_length must be >= 2 (one input token and one next-token label), got {args.max_seq_length}; "
                "with fewer tokens there is nothing to train on."
            )

        # -- model and tokenizer ------------------------------------------------------------
        if model is None and model_init is not None:
            model = model_init()
        if model is None:
            raise ValueError("SFTTrainer needs a model (checkpoint path, (module, params), or a loaded model) or model_init.")
        model_object = None
        if isinstance(model, str):
            warnings.warn(
                "You passed a model_id to the SFTTrainer. This will automatically create an `AutoModelForCausalLM` "
                "for you."
            )
            from rljax.models import AutoModelForCausalLM

            model_object = AutoModelForCausalLM.from_pretrained(model, **(model_init_kwargs or {}))
            module, params = model_object.module, (params if params is not None else model_object.params)
        elif hasattr(model, "module") and hasattr(model, "params") and not isinstance(model, tuple):
            model_object, module = model, model.module
            params = params if params is not None else model.params
        else:
            module, params = resolve_model(model, params)
        if tokenizer is None:
            tokenizer = resolve_tokenizer(model, None, "SFTTrainer needs a tokenizer when the model is not a checkpoint path.")
            if getattr(tokenizer, "pad_token", None) is None:  # TRL: only for the tokenizer it loads itself
                tokenizer.pad_token = tokenizer.eos_token
        if args.packing and isinstance(data_collator, D.DataCollatorForCompletionOnlyLM):
            raise ValueError(
                "You passed a `DataCollatorForCompletionOnlyLM` to the SFTTrainer. This is not compatible with the "
                "`packing` argument; set packing=False."
            )
        if args.max_seq_length is None:
            args = dataclasses.replace(
                args, max_seq_length=min(getattr(tokenizer, "model_max_length", 1024) or 1024, 1024)
            )
            warnings.warn(
                f"You didn't pass a `max_seq_length` argument to the SFTTrainer, this will default to {args.max_seq_length}"
            )

        module, params, peft_model = apply_peft(module, params, peft_config, "SFTTrainer")
        model_object = peft_model if peft_model is not None else model_object
        self.tokenizer = tokenizer  # before the base __init__: callbacks' on_init_end may read it
        super().__init__(
            module, params, args, None, None, mesh=mesh, model_object=model_object, callbacks=callbacks,
            compute_metrics=compute_metrics, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.neftune_noise_alpha = args.neftune_noise_alpha
        if compute_metrics is not None:
            self.predict_fn = self._make_predict_fn()

        # -- datasets -------------------------------------------------------------------------
        if formatting_func is None and args.dataset_text_field is None and train_dataset is not None:
            formatting_func = D.get_formatting_func_from_dataset(train_dataset, tokenizer)
        self.formatting_func = formatting_func
        if (
            not args.packing and args.dataset_text_field is None and formatting_func is None
            and not (train_dataset is not None and _is_tokenized(train_dataset))
        ):
            raise ValueError(
                "You passed `packing=False` to the SFTTrainer, but you didn't pass a `dataset_text_field` or "
                "`formatting_func` argument (and the dataset is not tokenized: no `input_ids`)."
            )
        self.train_dataset = self._prepare(train_dataset) if train_dataset is not None else None
        if isinstance(eval_dataset, Mapping) and not _is_tokenized(eval_dataset):
            self.eval_dataset = {name: self._prepare(ds) for name, ds in eval_dataset.items()}
        else:
            self.eval_dataset = self._prepare(eval_dataset) if eval_dataset is not None else None
        if getattr(tokenizer, "padding_side", None) not in (None, "right"):
            warnings.warn(
                "You passed a tokenizer with `padding_side` not equal to `right` to the SFTTrainer. This might lead "
                "to some unexpected behaviour due to overflow issues when training a model in half-precision. You "
                "might consider adding `tokenizer.padding_side = 'right'` to your code."
            )
        if data_collator is None and not args.packing:
            data_collator = D.DataCollatorForLanguageModeling(
                tokenizer, pad_to_multiple_of=args.pad_to_multiple_of, max_length=args.max_seq_length
            )
        self.data_collator = data_collator
        if args.packing and isinstance(self.train_dataset, PackedDataset):
            if args.max_steps > 0:
                warnings.warn(
                    "You passed `packing=True` to the SFTTrainer, and you are training your model with `max_steps` "
                    "strategy. The dataset will be iterated until the `max_steps` are reached."
                )
            self.train_dataset.infinite = args.max_steps > 0
            if isinstance(train_dataset, D.ConstantLengthDataset):
                train_dataset.infinite = self.train_dataset.infinite
        self.loss_fn = make_sft_loss(self.compute_module, args.neftune_noise_alpha)

    def _make_predict_fn(self) -> Callable:
        """``predict_fn(params, batch) -> (metrics, logits [b, W, vocab], labels [b, W])`` for
        ``compute_metrics``: one forward; logits and labels padded with -100 to ``W =
        max(max_seq_length, batch width)`` so batches of different bucketed widths concatenate
        (HF pads across batches with -100 the same way)."""
        import jax.numpy as jnp

        module, width = self.compute_module, self.args.max_seq_length

        def predict_fn(params, batch):
            logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
            loss, count = sft_loss_and_count(logits, batch["labels"])
            pad = max(width - logits.shape[1], 0)
            logits = jnp.pad(logits, ((0, 0), (0, pad), (0, 0)), constant_values=-100.0)
            labels = jnp.pad(jnp.asarray(batch["labels"]), ((0, 0), (0, pad)), constant_values=-100)
            return {"loss": loss, "num_tokens": count}, logits, labels

        return predict_fn

    # -- data ---------------------------------------------------------------------------------
    def _prepare(self, dataset: Any) -> Any:
        """One dataset -> rows the collator takes (see the module docstring)."""
        a = self.args
        field, func = a.dataset_text_field, self.formatting_func
        if dataset is None:
            raise ValueError("The dataset should not be None")
        if isinstance(dataset, PackedDataset):
            return dataset
        if isinstance(dataset, D.ConstantLengthDataset):
            return self._packed_rows(dataset.materialize())
        if isinstance(dataset, Mapping) and "input_ids" in dataset:  # pack_sequences' {"input_ids": [n, L], ...}
            ids = np.asarray(dataset["input_ids"])
            labels = np.asarray(dataset.get("labels", ids))
            return self._packed_rows([{"input_ids": x, "labels": y} for x, y in zip(ids, labels)])
        if field is None and func is None and _is_tokenized(dataset):
            rows = dataset if hasattr(dataset, "column_names") else list(dataset)
            return self._packed_rows(list(rows)) if a.packing else rows
        if a.packing:
            if field is None and func is None:
                raise ValueError(
                    "You need to pass a `dataset_text_field` or `formatting_func` argument to the SFTTrainer if you "
                    "want to use packing (or pass already packed rows with `input_ids`)."
                )
            packed = D.pack_sequences(
                dataset, self.tokenizer, a.max_seq_length, dataset_text_field=field, formatting_func=func,
                num_of_sequences=a.num_of_sequences, chars_per_token=a.chars_per_token,
                append_concat_token=a.append_concat_token, add_special_tokens=a.add_special_tokens, seed=a.seed,
            )
            return self._packed_rows([{"input_ids": x, "labels": y} for x, y in zip(packed["input_ids"], packed["labels"])])
        if not a.remove_unused_columns:
            extra = sorted(set(D._column_names(dataset)) - {"input_ids", "labels", "attention_mask"})
            if extra:
                warnings.warn(
                    f"You passed `remove_unused_columns=False` on a non-packed dataset: the columns {extra} are kept "
                    "in the dataset; the default collator ignores them."
                )
        return D.tokenize_sft_dataset(
            dataset, self.tokenizer, dataset_text_field=field, formatting_func=func,
            max_seq_length=a.max_seq_length, add_special_tokens=a.add_special_tokens,
            remove_unused_columns=a.remove_unused_columns, dataset_batch_size=a.dataset_batch_size,
            num_proc=a.dataset_num_proc,
        )

    @staticmethod
    def _packed_rows(rows: Sequence[Mapping[str, Any]]) -> PackedDataset:
        if not rows:
            raise ValueError(
                "Error occurred while packing the dataset. Make sure that your dataset has enough samples to at least "
                "yield one packed sequence (or lower max_seq_length)."
            )
        return PackedDataset(rows)

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Examples -> ``input_ids``, ``attention_mask``, ``labels`` ``[batch, L]`` NumPy arrays."""
        if self.data_collator is not None:
            batch = _as_numpy(self.data_collator(examples))
            if "attention_mask" not in batch:  # HF's collators omit it for lists of ids
                batch["attention_mask"] = np.ones_like(batch["input_ids"])
            if "labels" not in batch:
                raise ValueError("The data_collator must return `labels` (e.g. DataCollatorForLanguageModeling).")
            return batch
        # packing: rows of one length, stacked as they are (HF's default collator); mask all ones
        lengths = {len(e["input_ids"]) for e in examples}
        if len(lengths) == 1:
            ids = np.stack([np.asarray(e["input_ids"], np.int32) for e in examples])
            labels = np.stack([np.asarray(e.get("labels", e["input_ids"]), np.int32) for e in examples])
            return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
        return D.collate_lm(
            examples, getattr(self.tokenizer, "pad_token_id", None), max_length=self.args.max_seq_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of, keep_labels="labels" in examples[0],
            padding_side=getattr(self.tokenizer, "padding_side", "right"),
        )

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Optional[List[str]] = None,
                 metric_key_prefix: str = "eval") -> Dict[str, float]:
        """HF's ``evaluate(eval_dataset=None, ignore_keys=None, metric_key_prefix="eval")``:
        ``<prefix>_loss`` (mean over batches), ``<prefix>_perplexity = exp(loss)`` and, with
        ``compute_metrics``, its metrics. A dict of eval datasets (given here or at
        construction) is evaluated one by one with prefix ``<prefix>_<name>``, each logged
        separately, as HF does; the merged metrics are returned. A dataset given here is
        prepared like the constructor's (tokenized or packed)."""
        if eval_dataset is None:
            prepared = self.eval_dataset
        elif isinstance(eval_dataset, Mapping) and not _is_tokenized(eval_dataset):
            prepared = {name: self._prepare(ds) for name, ds in eval_dataset.items()}
        else:
            prepared = self._prepare(eval_dataset)
        if isinstance(prepared, Mapping) and not _is_tokenized(prepared):
            merged: Dict[str, float] = {}
            for name, one in prepared.items():
                merged.update(super().evaluate(one, f"{metric_key_prefix}_{name}", ignore_keys=ignore_keys))
            return merged
        return super().evaluate(prepared, metric_key_prefix, ignore_keys=ignore_keys)

    def _evaluation_loop(self, ds, prefix: str, predictions: bool):
        out, preds, labels = super()._evaluation_loop(ds, prefix, predictions)
        if f"{prefix}_loss" in out:
            out[f"{prefix}_perplexity"] = float(np.exp(out[f"{prefix}_loss"]))
        return out, preds, labels

    def _save(self, output_dir: str) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir, overwrite=True)
        self.tokenizer.save_pretrained(output_dir)
