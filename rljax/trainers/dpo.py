"""Direct Preference Optimisation: TRL 0.7.11's DPOTrainer over a pure, jitted train step.

Functional core:

* :func:`make_dpo_loss` builds ``loss_fn(params, batch, rng) -> (loss, metrics)``: one
  concatenated forward of the policy over chosen-then-rejected rows (``2B`` rows), sequence
  log-probs with :func:`get_batch_logps` (length-averaged for ``loss_type="ipo"``, as TRL),
  then :func:`rljax.losses.dpo_loss`. The reference log-probs arrive IN THE BATCH
  (``reference_chosen_logps`` / ``reference_rejected_logps``, ``[B]``), so the reference
  params never sit in the train step's closure.
* :func:`make_reference_logps_fn` builds the jitted ``(ref_params, batch) -> (chosen, rejected)``
  that fills those two fields, per batch or once over the dataset
  (``precompute_ref_log_probs=True``).

Batch layout (every leaf leads with the pair axis ``B``, so gradient accumulation can
split it): ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``,
``rejected_*`` likewise (all ``[B, L]`` int32, one common ``L``), and the two reference
log-prob vectors.

Metrics use TRL's keys (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/rejected``, ``logps/chosen``, ``logits/rejected``,
``logits/chosen``; ``eval_`` prefixed by ``evaluate()``), with TRL's semantics: rewards are
``beta * (policy - reference)`` logps even when ``reference_free``; accuracy is strict
``>``; ``logits/*`` average the full-vocabulary logits over every position of TRL's
(dynamically padded) batch, pads included. Our static bucketed padding adds positions
TRL does not have; they are left out of that mean, so the numbers equal TRL's.

Differences from TRL 0.7.11 (deliberate):

* Tokenization adds BOS only when the tokenizer has one, and never twice
  (:func:`rljax.data.dpo_tokenize_row`; TRL issues #907/#1073).
* ``generate_during_eval=True`` raises a ``ValueError``: TRL uses it only to log sample
  generations to Weights & Biases, which rljax does not do (sample with
  :func:`rljax.generation.generate` on ``trainer.params`` instead).
* Decoder-only models only; PEFT adapters, ``compute_metrics``, callbacks and custom
  optimizers are not supported (a ``ValueError`` says so).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from rljax import data as D
from rljax.dpo import make_dpo_loss, make_reference_logps_fn
from rljax.losses import DPO_LOSS_TYPES
from rljax.trainers.base import (
    Trainer,
    TrainingArguments,
    apply_overrides,
    resolve_model,
)

_REF_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


@dataclasses.dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus DPOTrainer's own options (TRL 0.7.11 names and defaults).

    TRL 0.7.11 takes these as ``DPOTrainer`` keyword arguments; here they may be set on the
    config or passed to the trainer (keywords win). ``max_length`` / ``max_prompt_length``
    of ``None`` become 512 / 128 with a warning, as in TRL.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"  # "sigmoid" | "hinge" | "ipo" | "kto_pair"
    label_pad_token_id: int = -100
    padding_value: Optional[int] = None  # None: tokenizer.pad_token_id
    truncation_mode: str = "keep_end"  # "keep_end" | "keep_start"
    max_length: Optional[int] = None
    max_prompt_length: Optional[int] = None
    max_target_length: Optional[int] = None  # encoder-decoder only in TRL; unused (decoder-only)
    disable_dropout: bool = True
    generate_during_eval: bool = False
    precompute_ref_log_probs: bool = False
    reference_free: bool = False
    pad_to_multiple_of: Optional[int] = None  # rljax: bucketed padding (None: rljax.data default)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; choose one of {list(DPO_LOSS_TYPES)}.")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"Unknown truncation_mode {self.truncation_mode!r}; use 'keep_end' or 'keep_start'.")
        if self.beta <= 0 and self.loss_type == "ipo":
            raise ValueError(f"The ipo loss divides by beta; beta must be > 0, got {self.beta}.")


# ---------------------------------------------------------------------------------------
# Trainer shell
# ---------------------------------------------------------------------------------------

_UNSUPPORTED = {
    "peft_config": "PEFT adapters are not supported by rljax's DPOTrainer; pass full params.",
    "compute_metrics": "compute_metrics is not supported; DPO metrics are computed inside the jitted step.",
    "callbacks": "callbacks are not supported; read trainer.log_history or metrics.jsonl in output_dir.",
    "optimizers": "custom optimizers are not supported; set the optimizer through DPOConfig (AdamW fields).",
    "preprocess_logits_for_metrics": "preprocess_logits_for_metrics is not supported.",
    "model_adapter_name": "PEFT adapters are not supported by rljax's DPOTrainer.",
    "ref_adapter_name": "PEFT adapters are not supported by rljax's DPOTrainer.",
}


class DPOTrainer(Trainer):
    """TRL's DPOTrainer: ``DPOTrainer(model, ref_model, beta=0.1, args=..., train_dataset=..., tokenizer=...)``.

    ``model`` / ``ref_model``: a checkpoint path, ``(module, params)``, a flax module with
    ``params=`` / ``ref_params=``, or an object with ``.module``/``.params``. Without a
    reference model (and without ``ref_params``) the reference is a frozen copy of the
    policy's initial params (TRL's ``create_reference_model``). The reference is never
    trained: its params are passed to a separate jitted forward, not to the optimizer.

    Datasets have string columns ``prompt``, ``chosen``, ``rejected`` (tokenized here as
    TRL's ``tokenize_row``). Options TRL takes as keyword arguments (beta, loss_type,
    max_length, precompute_ref_log_probs, ...) may be given here or on ``DPOConfig``.
    """

    def __init__(
        self,
        model: Any = None,
        ref_model: Any = None,
        beta: Optional[float] = None,
        label_smoothing: Optional[float] = None,
        loss_type: Optional[str] = None,
        args: Optional[DPOConfig] = None,
        data_collator: Optional[Callable] = None,
        label_pad_token_id: Optional[int] = None,
        padding_value: Optional[int] = None,
        truncation_mode: Optional[str] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        max_length: Optional[int] = None,
        max_prompt_length: Optional[int] = None,
        max_target_length: Optional[int] = None,
        is_encoder_decoder: Optional[bool] = None,
        disable_dropout: Optional[bool] = None,
        generate_during_eval: Optional[bool] = None,
        precompute_ref_log_probs: Optional[bool] = None,
        reference_free: Optional[bool] = None,
        params: Any = None,
        mesh: Any = None,
        ref_params: Any = None,
        dataset_num_proc: Optional[int] = None,  # accepted for TRL compatibility; tokenization is sequential
        model_init_kwargs: Optional[dict] = None,  # accepted; from_pretrained takes no extra options
        ref_model_init_kwargs: Optional[dict] = None,
        **unsupported: Any,
    ):
        for name, value in unsupported.items():
            if name not in _UNSUPPORTED:
                raise TypeError(f"DPOTrainer got an unexpected keyword argument {name!r}.")
            if value is not None:
                raise ValueError(_UNSUPPORTED[name])
        if is_encoder_decoder:
            raise ValueError("rljax's DPOTrainer supports decoder-only (causal LM) models only.")
        args = args if args is not None else DPOConfig()
        if not isinstance(args, DPOConfig):
            args = DPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)})
        overrides = dict(
            beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, label_pad_token_id=label_pad_token_id,
            padding_value=padding_value, truncation_mode=truncation_mode, max_length=max_length,
            max_prompt_length=max_prompt_length, max_target_length=max_target_length, disable_dropout=disable_dropout,
            generate_during_eval=generate_during_eval, precompute_ref_log_probs=precompute_ref_log_probs,
            reference_free=reference_free,
        )
        args = apply_overrides(args, overrides, "DPOTrainer")
        if args.generate_during_eval:
            raise ValueError(
                "generate_during_eval=True is not supported: TRL uses it only to log sample generations to "
                "Weights & Biases. Set it to False and sample with rljax.generation.generate(trainer.model, "
                "trainer.params, ...) if you want to inspect generations."
            )
        if args.max_length is None:
            warnings.warn("max_length not set for DPOTrainer; using 512 (TRL's default).", UserWarning)
            args = dataclasses.replace(args, max_length=512)
        if args.max_prompt_length is None:
            warnings.warn("max_prompt_length not set for DPOTrainer; using 128 (TRL's default).", UserWarning)
            args = dataclasses.replace(args, max_prompt_length=128)
        if args.label_smoothing > 0 and args.loss_type != "sigmoid":
            warnings.warn(f"label_smoothing is ignored by the {args.loss_type!r} loss (TRL honours it for 'sigmoid' only).")

        if model is None:
            raise ValueError("DPOTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        if tokenizer is None:
            if not isinstance(model, str):
                raise ValueError("DPOTrainer needs a tokenizer to tokenize the prompt/chosen/rejected texts.")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        if args.padding_value is None:
            args = dataclasses.replace(args, padding_value=D.ensure_pad_token(tokenizer))

        module, params = resolve_model(model, params)
        if ref_model is not None:
            ref_module, ref_params = resolve_model(ref_model, ref_params)
        else:  # create_reference_model semantics: the initial policy, frozen (jax arrays are immutable)
            ref_module, ref_params = module, (ref_params if ref_params is not None else params)
        super().__init__(module, params, args, None, None, mesh=mesh)
        self.tokenizer = tokenizer
        self.ref_model = ref_module
        self.ref_params = ref_params
        self.data_collator = data_collator or D.DPODataCollatorWithPadding(
            args.padding_value, args.label_pad_token_id, max_length=args.max_length,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        self.loss_fn = make_dpo_loss(
            module, beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
            reference_free=args.reference_free, label_pad_token_id=args.label_pad_token_id,
            disable_dropout=args.disable_dropout,
        )
        self._reference_logps = make_reference_logps_fn(
            ref_module, average_log_prob=args.loss_type == "ipo", label_pad_token_id=args.label_pad_token_id
        )
        self.train_dataset = self.tokenize_dataset(train_dataset) if train_dataset is not None else None
        self.eval_dataset = self.tokenize_dataset(eval_dataset) if eval_dataset is not None else None
        self._precomputed_train = False
        self._precomputed_eval = False

    # -- data -------------------------------------------------------------------------------
    def tokenize_dataset(self, dataset: Any) -> List[dict]:
        """prompt/chosen/rejected text rows -> token rows (:func:`rljax.data.dpo_tokenize_row`)."""
        columns = D._column_names(dataset)
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(
                f"DPO datasets need string columns 'prompt', 'chosen' and 'rejected'; missing {missing} "
                f"(columns: {columns})."
            )
        a = self.args
        rows = []
        for row in dataset:
            toks = D.dpo_tokenize_row(
                row, self.tokenizer, max_length=a.max_length, max_prompt_length=a.max_prompt_length,
                truncation_mode=a.truncation_mode, label_pad_token_id=a.label_pad_token_id,
            )
            for k in _REF_KEYS:  # a dataset that already carries reference log-probs keeps them
                if k in row:
                    toks[k] = float(row[k])
            rows.append(toks)
        return rows

    def _pad_pairs(self, examples: Sequence[dict]) -> Dict[str, np.ndarray]:
        """Collate rows and give chosen and rejected one common (bucketed) width."""
        b = self.data_collator(list(examples))
        a = self.args
        cat = D.concatenated_inputs(b, a.padding_value, a.label_pad_token_id)
        n = len(examples)
        batch = {}
        for k in ("input_ids", "attention_mask", "labels"):
            batch[f"chosen_{k}"] = cat[f"concatenated_{k}"][:n]
            batch[f"rejected_{k}"] = cat[f"concatenated_{k}"][n:]
        for k in _REF_KEYS:
            if k in b:
                batch[k] = np.asarray(b[k], np.float32)
        return batch

    def collate(self, examples: Sequence[dict]) -> Dict[str, Any]:
        """Pad a list of token rows; add the reference log-probs unless precomputed."""
        batch = self._pad_pairs(examples)
        if not all(k in batch for k in _REF_KEYS):
            rc, rr = self._reference_logps(self.ref_params, batch)
            batch["reference_chosen_logps"], batch["reference_rejected_logps"] = rc, rr
        return batch

    def precompute_reference_logps(self, dataset: List[dict], batch_size: int) -> List[dict]:
        """One pass of the reference model over ``dataset`` (in order): returns the rows with
        float ``reference_chosen_logps`` / ``reference_rejected_logps`` added."""
        out = []
        for start in range(0, len(dataset), batch_size):
            rows = list(dataset[start : start + batch_size])
            n = len(rows)
            rows_padded = rows + [rows[0]] * (batch_size - n)  # one compiled shape for the tail
            batch = self._pad_pairs([{k: r[k] for k in r if k not in _REF_KEYS} for r in rows_padded])
            rc, rr = jax.device_get(self._reference_logps(self.ref_params, batch))
            for i, r in enumerate(rows):
                out.append(dict(r, reference_chosen_logps=float(rc[i]), reference_rejected_logps=float(rr[i])))
        return out

    # -- loop -------------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        if self.args.precompute_ref_log_probs and not self._precomputed_train and self.train_dataset:
            self.train_dataset = self.precompute_reference_logps(self.train_dataset, self.args.per_device_train_batch_size)
            self._precomputed_train = True
        return super().train()

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Mean DPO loss and metrics over the eval set (keys ``eval_loss``, ``eval_rewards/chosen``, ...).

        ``eval_dataset``: text rows (prompt/chosen/rejected), tokenized here; None uses the
        trainer's."""
        a = self.args
        if eval_dataset is not None:
            ds = self.tokenize_dataset(eval_dataset)
            if a.precompute_ref_log_probs:
                ds = self.precompute_reference_logps(ds, a.per_device_eval_batch_size)
        else:
            if a.precompute_ref_log_probs and not self._precomputed_eval and self.eval_dataset:
                self.eval_dataset = self.precompute_reference_logps(self.eval_dataset, a.per_device_eval_batch_size)
                self._precomputed_eval = True
            ds = self.eval_dataset
        return super().evaluate(ds, metric_key_prefix)

    def _save(self, output_dir: str) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.model, self.params, output_dir, overwrite=True)
        self.tokenizer.save_pretrained(output_dir)
