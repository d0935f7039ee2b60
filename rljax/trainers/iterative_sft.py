"""Iterative SFT: TRL 0.7.11's IterativeSFTTrainer, a ``step()`` API over a jitted train step.

Each ``step(...)`` call makes one shuffled pass over the samples it is given, in
minibatches of ``per_device_train_batch_size * gradient_accumulation_steps`` examples,
one optimizer update per minibatch; the optimizer state (and the learning-rate
schedule's position) persists across calls. Use it for expert-iteration style loops
(generate -> filter -> ``step``).

Loss: next-token cross-entropy averaged over every counted token of the minibatch (as
HF's causal-LM loss over one batch). Each row carries a ``loss_weight`` (``accum / tokens
in its minibatch``; 0 for filler rows), so a short last minibatch is padded to the full
shape (one compiled shape per length bucket) without changing the loss or the update.

Differences from TRL 0.7.11 (deliberate, also listed in the README):

* ``max_length`` truncates each SEQUENCE (``truncation_mode="keep_end"`` keeps the last
  tokens, ``"keep_start"`` the first); TRL slices the batch axis instead.
* ``texts_labels`` is honoured (TRL tokenizes ``texts`` again and ignores it). For these
  decoder-only models, ``texts[i]`` is the prompt and ``texts_labels[i]`` its target: the
  model reads ``texts[i] + texts_labels[i]`` (the target tokenized without special tokens
  and appended to the prompt's ids) and the loss counts only the target tokens (prompt
  positions get label -100). TRL has no such masking (its decoder-only path trains on
  every non-pad token).
* ``labels`` given with ``input_ids`` are honoured (TRL's decoder-only collator recomputes
  them from the ids); without them labels are the ids with pad-token positions -100, as TRL.
* Giving both ``input_ids`` and ``texts`` is a ``ValueError`` (TRL warns and uses texts).
* With ``max_steps <= 0`` the learning rate is constant after warmup: the horizon is
  unknown. (TRL builds its linear schedule over ``max_steps=-1`` steps, i.e. learning
  rate 0 from the first update.) With ``max_steps > 0`` the configured schedule runs over
  ``max_steps`` updates.
* Rows of 2-D inputs are compacted to their attended tokens (``attention_mask == 1``)
  before truncation and re-padding; with the cumulative position ids this is the same
  computation for contiguous (left- or right-) padding.

Encoder-decoder models (T5; TRL's ``is_encoder_decoder`` path): ``input_ids`` /
``texts`` are the encoder inputs and ``labels`` / ``texts_labels`` the decoder targets
(required, as TRL); the loss is transformers' seq2seq cross-entropy (decoder inputs = the
labels shifted right, no shift in the loss), token-averaged over the minibatch. Labels equal
to the pad token are not counted (as TRL); ``texts_labels`` are tokenized with the
tokenizer's special tokens (T5 appends eos; TRL tokenizes ``texts`` again here, a bug).
``max_length`` cuts encoder inputs and labels alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax import data as D
from rljax.iterative_sft import make_iterative_sft_loss
from rljax.train_state import TrainState
from rljax.trainers.base import (
    Trainer,
    TrainingArguments,
    make_eval_step,
    make_optimizer,
    make_schedule,
    resolve_model,
    resolve_tokenizer,
)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rows(name: str, value: Any) -> List[np.ndarray]:
    """A sequence of 1-D sequences (a list, a ``datasets`` Column, torch tensors, ...) or a
    2-D array -> list of 1-D int arrays."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # NumPy / JAX / torch array
        arr = _to_numpy(value)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a list of 1-D sequences or a 2-D [batch, seq] array, got shape {arr.shape}.")
        rows = list(arr)
    elif isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of 1-D sequences or a 2-D [batch, seq] array, got {type(value).__name__}.")
    else:
        rows = [_to_numpy(v) for v in value]
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {r.shape}.")
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"{name}[{i}] must hold integers, got dtype {r.dtype}.")
    return [r.astype(np.int64) for r in rows]


def _count(row: Dict[str, np.ndarray], encoder_decoder: bool = False) -> int:
    """Tokens a row contributes to the loss (decoder-only: labels are shifted by one)."""
    return int(np.sum((row["labels"] if encoder_decoder else row["labels"][1:]) != -100))


_SEQ2SEQ_NEEDS_LABELS = ("No 'labels' or 'text_labels' are provided. When using an encoder-decoder architecture, "
                         "'labels' or 'text_labels' must be passed.")


def _check_texts(name: str, value: Any) -> List[str]:
    """Any sequence of strings (a list, a tuple, a ``datasets`` Column, ...) -> list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of strings (any sequence of str), got {type(value).__name__}.")
    texts = list(value)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of strings (any sequence of str).")
    return texts


class IterativeSFTTrainer(Trainer):
    """TRL's IterativeSFTTrainer: ``IterativeSFTTrainer(model, args, tokenizer)`` then
    ``trainer.step(input_ids=..., attention_mask=..., labels=...)`` or
    ``trainer.step(texts=..., texts_labels=...)``.

    ``model``: a checkpoint path, ``(module, params)``, a flax module with ``params=``, or
    an object with ``.module``/``.params``. ``args``: :class:`rljax.trainers.base.TrainingArguments`
    (learning_rate, per_device_train_batch_size, gradient_accumulation_steps, max_steps,
    warmup, AdamW fields, seed, output_dir). ``max_length`` / ``truncation_mode``: see the
    module docstring.
    """

    def __init__(
        self,
        model: Any = None,
        args: Optional[TrainingArguments] = None,
        tokenizer: Any = None,
        optimizers: Any = (None, None),
        data_collator: Optional[Callable] = None,
        eval_dataset: Any = None,
        max_length: Optional[int] = None,
        truncation_mode: str = "keep_end",
        preprocess_logits_for_metrics: Optional[Callable] = None,
        compute_metrics: Optional[Callable] = None,
        optimize_device_cache: bool = False,
        params: Any = None,
        mesh: Any = None,
        pad_to_multiple_of: Optional[int] = None,
    ):
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError("custom optimizers are not supported; set the optimizer through TrainingArguments.")
        if data_collator is not None:
            raise ValueError("data_collator is not supported: IterativeSFTTrainer pads and builds labels itself.")
        if compute_metrics is not None or preprocess_logits_for_metrics is not None:
            raise ValueError("compute_metrics / preprocess_logits_for_metrics are not supported.")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        if model is None:
            raise ValueError("IterativeSFTTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        tokenizer = resolve_tokenizer(
            model, tokenizer, "IterativeSFTTrainer needs a tokenizer when the model is not a checkpoint path."
        )
        self.pad_token_id = D.ensure_pad_token(tokenizer)
        args = args if args is not None else TrainingArguments()
        model_object = model if hasattr(model, "module") and hasattr(model, "params") and not isinstance(model, tuple) else None
        module, params = resolve_model(model, params)
        super().__init__(module, params, args, None, eval_dataset, mesh=mesh, model_object=model_object)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.optimize_device_cache = optimize_device_cache  # accepted for TRL compatibility; no effect
        self.pad_to_multiple_of = pad_to_multiple_of
        self.is_encoder_decoder = bool(getattr(module, "is_encoder_decoder", False))
        self.loss_fn = make_iterative_sft_loss(self.compute_module)
        self._num_step_calls = 0

    # -- inputs -----------------------------------------------------------------------------
    def prepare_inputs(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
    ) -> List[Dict[str, np.ndarray]]:
        """Validate ``step``'s inputs; return rows of ``input_ids``, ``attention_mask``,
        ``labels`` (1-D, truncated to ``max_length``)."""
        if input_ids is None and texts is None:
            raise ValueError("step() needs `input_ids` or `texts`.")
        if input_ids is not None and texts is not None:
            raise ValueError("Give either `input_ids` (token ids) or `texts` (strings) to step(), not both.")
        if self.is_encoder_decoder:
            rows = self._seq2seq_rows(input_ids, attention_mask, labels, texts, texts_labels)
            return self._truncate(rows)
        if texts is not None:
            if attention_mask is not None or labels is not None:
                raise ValueError("With `texts`, pass targets as `texts_labels` (not `labels` / `attention_mask`).")
            texts = _check_texts("texts", texts)
            if texts_labels is not None:
                texts_labels = _check_texts("texts_labels", texts_labels)
                if len(texts_labels) != len(texts):
                    raise ValueError(f"texts ({len(texts)}) and texts_labels ({len(texts_labels)}) must have the same length.")
            ids_list = self.tokenizer(texts)["input_ids"]
            rows = []
            if texts_labels is None:
                for ids in ids_list:
                    ids = np.asarray(ids, np.int64)
                    rows.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": self._default_labels(ids)})
            else:
                targets = self.tokenizer(texts_labels, add_special_tokens=False)["input_ids"]
                for p, t in zip(ids_list, targets):
                    ids = np.asarray(list(p) + list(t), np.int64)
                    lab = np.asarray([-100] * len(p) + list(t), np.int64)
                    rows.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": lab})
        else:
            if texts_labels is not None:
                raise ValueError("`texts_labels` goes with `texts`; with `input_ids` pass `labels` (token ids).")
            ids_rows = _rows("input_ids", input_ids)
            n = len(ids_rows)
            mask_rows = _rows("attention_mask", attention_mask) if attention_mask is not None else None
            label_rows = _rows("labels", labels) if labels is not None else None
            for name, other in (("attention_mask", mask_rows), ("labels", label_rows)):
                if other is None:
                    continue
                if len(other) != n:
                    raise ValueError(f"input_ids has {n} rows but {name} has {len(other)}.")
                for i, (a, b) in enumerate(zip(ids_rows, other)):
                    if len(a) != len(b):
                        raise ValueError(f"input_ids[{i}] has {len(a)} tokens but {name}[{i}] has {len(b)}.")
            rows = []
            for i, ids in enumerate(ids_rows):
                keep = mask_rows[i].astype(bool) if mask_rows is not None else np.ones(len(ids), bool)
                ids_i = ids[keep]
                lab = label_rows[i][keep] if label_rows is not None else self._default_labels(ids_i)
                rows.append({"input_ids": ids_i, "attention_mask": np.ones_like(ids_i), "labels": lab})
        return self._truncate(rows)

    def _truncate(self, rows: List[Dict[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
        """Cut every field of every row to ``max_length`` (``truncation_mode``); reject empty rows."""
        if not rows:
            raise ValueError("step() got no samples.")
        if self.max_length is not None:
            for r in rows:
                for k in r:
                    r[k] = np.asarray(D.truncate_sequences([r[k]], self.max_length, self.truncation_mode)[0], np.int64)
        if any(len(r["input_ids"]) == 0 for r in rows):
            raise ValueError("A sample has no tokens (empty text or all-zero attention_mask).")
        if self.is_encoder_decoder and any(len(r["labels"]) == 0 for r in rows):
            raise ValueError("A sample has no labels (empty texts_labels or labels row).")
        return rows

    def _seq2seq_rows(self, input_ids, attention_mask, labels, texts, texts_labels) -> List[Dict[str, np.ndarray]]:
        """Encoder-decoder rows: encoder ``input_ids`` / ``attention_mask`` and decoder ``labels``
        (own length; pad-token labels -> -100, as TRL)."""
        pad = self.pad_token_id
        if texts is not None:
            if attention_mask is not None or labels is not None:
                raise ValueError("With `texts`, pass targets as `texts_labels` (not `labels` / `attention_mask`).")
            if texts_labels is None:
                raise ValueError(_SEQ2SEQ_NEEDS_LABELS)
            texts, texts_labels = _check_texts("texts", texts), _check_texts("texts_labels", texts_labels)
            if len(texts_labels) != len(texts):
                raise ValueError(f"texts ({len(texts)}) and texts_labels ({len(texts_labels)}) must have the same length.")
            ids_rows = [np.asarray(x, np.int64) for x in self.tokenizer(texts)["input_ids"]]
            mask_rows = [np.ones_like(x) for x in ids_rows]
            label_rows = [np.asarray(x, np.int64) for x in self.tokenizer(texts_labels)["input_ids"]]
        else:
            if texts_labels is not None:
                raise ValueError("`texts_labels` goes with `texts`; with `input_ids` pass `labels` (token ids).")
            if labels is None:
                raise ValueError(_SEQ2SEQ_NEEDS_LABELS)
            ids_rows = _rows("input_ids", input_ids)
            label_rows = _rows("labels", labels)
            mask_rows = _rows("attention_mask", attention_mask) if attention_mask is not None else [
                np.ones_like(x) for x in ids_rows]
            for name, other in (("attention_mask", mask_rows), ("labels", label_rows)):
                if len(other) != len(ids_rows):
                    raise ValueError(f"input_ids has {len(ids_rows)} rows but {name} has {len(other)}.")
            for i, (a, b) in enumerate(zip(ids_rows, mask_rows)):
                if len(a) != len(b):
                    raise ValueError(f"input_ids[{i}] has {len(a)} tokens but attention_mask[{i}] has {len(b)}.")
        rows = []
        for ids, mask, lab in zip(ids_rows, mask_rows, label_rows):
            keep = mask.astype(bool)
            lab = np.where(lab == pad, -100, lab)
            rows.append({"input_ids": ids[keep], "attention_mask": np.ones(int(keep.sum()), np.int64), "labels": lab})
        return rows

    def _default_labels(self, ids: np.ndarray) -> np.ndarray:
        """DataCollatorForLanguageModeling's labels: the ids, pad-token positions -100."""
        return np.where(ids == self.pad_token_id, -100, ids)

    def _collate(self, rows: Sequence[dict], size: int, accum: int, total_tokens: float) -> Dict[str, np.ndarray]:
        """Pad ``rows`` to ``size`` rows (fillers: copies of row 0 with weight 0) of one
        bucketed width (encoder-decoder: one for the encoder inputs, one for the labels), with
        per-row ``loss_weight``."""
        rows = list(rows)
        n = len(rows)
        rows = rows + [rows[0]] * (size - n)
        if self.is_encoder_decoder:
            multiple = D.DEFAULT_PAD_MULTIPLE if self.pad_to_multiple_of is None else int(self.pad_to_multiple_of)

            def width(key):
                return D.bucket_length(max(len(r[key]) for r in rows), multiple, self.max_length)

            enc, dec = width("input_ids"), width("labels")
            batch = {"input_ids": D.pad_sequences([r["input_ids"] for r in rows], self.pad_token_id, "right", enc),
                     "attention_mask": D.pad_sequences([r["attention_mask"] for r in rows], 0, "right", enc),
                     "labels": D.pad_sequences([r["labels"] for r in rows], -100, "right", dec)}
        else:
            batch = D.collate_lm(
                rows, self.pad_token_id, max_length=self.max_length, pad_to_multiple_of=self.pad_to_multiple_of,
                keep_labels=True,
            )
        weight = np.zeros(size, np.float32)
        weight[:n] = accum / max(total_tokens, 1.0)
        batch["loss_weight"] = weight
        return batch

    # -- optimisation -----------------------------------------------------------------------
    def create_state(self) -> TrainState:
        args = self.args
        if args.max_steps > 0:
            steps, opt_args = args.max_steps, args
        else:  # unknown horizon: constant after warmup
            steps = max(args.warmup_steps, 1)
            opt_args = dataclasses.replace(args, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0)
        self.schedule = make_schedule(opt_args, steps)
        tx = make_optimizer(opt_args, steps)
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self._init_params)
        return TrainState.create(params, tx, jax.random.PRNGKey(args.seed))

    def step(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
    ) -> Dict[str, float]:
        """One shuffled pass over the given samples, one optimizer update per minibatch.

        Inputs: ``input_ids`` (list of 1-D sequences or a 2-D array) with optional
        ``attention_mask`` and ``labels`` of the same shapes, or ``texts`` (list of str) with
        optional ``texts_labels``. Returns ``{"loss", "grad_norm", "learning_rate",
        "num_updates", "num_tokens", "step"}``: loss and grad_norm are means over this
        call's updates, learning_rate the last update's, step the total update count.
        """
        rows = self.prepare_inputs(input_ids, attention_mask, labels, texts, texts_labels)
        args = self.args
        accum = args.gradient_accumulation_steps
        size = args.train_batch_size
        if self.train_state is None:
            self.train_state = self.create_state()
        if self._train_step is None:
            self._train_step = self._build_train_step()  # shards state and step when a mesh is set
        order = np.random.default_rng([args.seed, self._num_step_calls]).permutation(len(rows))
        self._num_step_calls += 1
        metrics, num_tokens = [], 0
        for start in range(0, len(rows), size):
            mb = [rows[i] for i in order[start : start + size]]
            tokens = sum(_count(r, self.is_encoder_decoder) for r in mb)
            num_tokens += tokens
            batch = self._collate(mb, size, accum, tokens)
            self.train_state, m = self._train_step(self.train_state, self._place_batch(batch))
            metrics.append(m)
        metrics = jax.device_get(metrics)
        step = int(self.train_state.step)
        stats = {
            "loss": float(np.mean([m["loss"] for m in metrics])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
            "learning_rate": float(self.schedule(step - 1)),
            "num_updates": len(metrics),
            "num_tokens": num_tokens,
            "step": step,
        }
        self._log(dict(stats))
        if self._model_object is not None:  # TRL trains the model in place
            self._write_back_params()
        return stats

    def evaluate(
        self,
        eval_dataset: Any = None,
        metric_key_prefix: str = "eval",
        *,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        texts: Optional[Sequence[str]] = None,
        texts_labels: Optional[Sequence[str]] = None,
    ) -> Dict[str, float]:
        """Token-mean loss (no update) on step()-style inputs, or on ``eval_dataset`` /
        the trainer's eval dataset: rows (dicts) with ``input_ids`` (and optionally
        ``attention_mask``, ``labels``) or with ``text`` (and optionally ``text_label``)."""
        if input_ids is None and texts is None:
            ds = eval_dataset if eval_dataset is not None else self.eval_dataset
            if ds is None or len(ds) == 0:
                raise ValueError("evaluate() needs step()-style inputs or a non-empty eval_dataset.")
            ds = list(ds)
            if "text" in ds[0]:
                texts = [r["text"] for r in ds]
                texts_labels = [r["text_label"] for r in ds] if "text_label" in ds[0] else None
            else:
                input_ids = [r["input_ids"] for r in ds]
                attention_mask = [r["attention_mask"] for r in ds] if "attention_mask" in ds[0] else None
                labels = [r["labels"] for r in ds] if "labels" in ds[0] else None
        rows = self.prepare_inputs(input_ids, attention_mask, labels, texts, texts_labels)
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.loss_fn)
        total = float(sum(_count(r, self.is_encoder_decoder) for r in rows))
        size = self.args.per_device_eval_batch_size
        loss = 0.0
        for start in range(0, len(rows), size):
            batch = self._collate(rows[start : start + size], size, 1, total_tokens=total)
            loss += float(self._eval_step(self.params, batch)["loss"])
        out = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_num_tokens": total}
        self.log_history.append(dict(out))
        return out

    def train(self):
        raise ValueError("IterativeSFTTrainer is driven by step(...); it has no train() loop.")

    def _save(self, output_dir: str) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir, overwrite=True)
        self.tokenizer.save_pretrained(output_dir)
