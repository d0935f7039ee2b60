"""Reward modelling: TRL 0.7.11's RewardTrainer over a pure, jitted train step.

The model is :class:`rljax.models.SequenceScoreModel` (HF ``*ForSequenceClassification``
with ``num_labels=1``: a linear score read at each row's last attended token). One
forward scores chosen and rejected rows together (``2B`` rows; TRL runs two forwards,
same numbers), and the loss is :func:`rljax.losses.reward_loss`, the Bradley-Terry loss
``mean(-log_sigmoid(r_chosen - r_rejected - margin))``.

Batch (every leaf leads with the pair axis ``B``): ``input_ids_chosen``,
``attention_mask_chosen``, ``input_ids_rejected``, ``attention_mask_rejected``
(``[B, L]`` int32) and optionally ``margin`` (``[B]`` float32).

Metrics: ``accuracy`` (TRL's ``compute_accuracy``: a pair counts as correct when
``r_chosen >= r_rejected``, so ties count as correct), ``accuracy_strict``
(``r_chosen > r_rejected``), ``rewards_chosen`` / ``rewards_rejected`` (batch means);
``evaluate()`` prefixes them with ``eval_``.

Differences from TRL 0.7.11 (deliberate):

* ``margin`` is applied per pair (TRL broadcasts a ``[B]`` margin against ``[B, 1]``
  rewards into a ``[B, B]`` matrix).
* A score model with ``num_labels != 1`` is a ``ValueError`` (TRL silently broadcasts the
  extra logits into the loss, TRL issue #558).
* A causal LM given as ``model`` is turned into a score model: its trunk plus a fresh
  ``score`` head (what transformers does when a causal-LM checkpoint is loaded into
  ``*ForSequenceClassification``).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax import data as D
from rljax.losses import reward_loss
from rljax.reward import as_score_model, compute_accuracy, make_reward_loss, make_reward_predict
from rljax.trainers.base import Trainer, TrainingArguments, apply_peft, model_object_of

__all__ = ["RewardConfig", "RewardTrainer", "compute_accuracy", "REWARD_COLUMNS"]

REWARD_COLUMNS = ("input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected")


@dataclasses.dataclass
class RewardConfig(TrainingArguments):
    """TrainingArguments plus RewardTrainer's own option (TRL 0.7.11): ``max_length``, the
    default collator's padding cap (None: 512). ``pad_to_multiple_of`` is rljax's bucketing
    granularity (None: ``rljax.data`` default)."""

    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None


# ---------------------------------------------------------------------------------------
# Trainer shell
# ---------------------------------------------------------------------------------------


def _check_columns(dataset: Any, which: str) -> None:
    columns = D._column_names(dataset)
    missing = [c for c in REWARD_COLUMNS if c not in columns]
    if missing:
        hint = ""
        if {"chosen", "rejected"} <= set(columns):
            hint = " The dataset holds text: tokenize it first with rljax.data.tokenize_preference_dataset(dataset, tokenizer)."
        raise ValueError(
            f"The {which} dataset must have the columns {list(REWARD_COLUMNS)} (and optionally 'margin'); "
            f"missing: {missing}.{hint}"
        )


class RewardTrainer(Trainer):
    """TRL's RewardTrainer: ``RewardTrainer(model, args, train_dataset=..., tokenizer=...)``.

    ``model``: see :func:`as_score_model` (e.g. ``rljax.models.AutoModelForSequenceClassification
    .from_pretrained(path, num_labels=1)``; such a model object gets the trained params at the
    end of ``train()``). Datasets carry TRL's tokenized columns (``input_ids_chosen``,
    ``attention_mask_chosen``, ``input_ids_rejected``, ``attention_mask_rejected``, optional
    ``margin``). ``data_collator`` defaults to :class:`rljax.data.RewardDataCollatorWithPadding`
    (bucketed static lengths). ``compute_metrics`` defaults to TRL's :func:`compute_accuracy`
    over ``predict``-style predictions (``softmax([r_chosen, r_rejected])``, labels 0);
    ``callbacks`` / ``optimizers`` / ``preprocess_logits_for_metrics``: see
    :class:`rljax.trainers.base.Trainer`. ``peft_config``: train LoRA adapters (TaskType.SEQ_CLS also trains ``score``).
    """

    _tag_names = ["trl", "reward-trainer"]

    def __init__(
        self,
        model: Any = None,
        args: Optional[RewardConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        model_init: Optional[Callable[[], Any]] = None,
        compute_metrics: Optional[Callable] = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        max_length: Optional[int] = None,
        peft_config: Any = None,
        params: Any = None,
        mesh: Any = None,
    ):
        args = args if args is not None else RewardConfig()
        if not isinstance(args, RewardConfig):
            warnings.warn("Using TrainingArguments for `args` is deprecated in TRL; use RewardConfig instead.", FutureWarning)
            args = RewardConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)})
        if max_length is not None:
            if args.max_length is not None and args.max_length != max_length:
                raise ValueError("max_length is set both on RewardTrainer and on RewardConfig; set it on RewardConfig only.")
            warnings.warn("RewardTrainer(max_length=...) is deprecated in TRL; set RewardConfig.max_length.", FutureWarning)
            args = dataclasses.replace(args, max_length=max_length)
        if model is None and model_init is not None:
            model = model_init()
        if model is None:
            raise ValueError("RewardTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        if compute_metrics is None:
            compute_metrics = compute_accuracy
        self.use_reward_data_collator = data_collator is None
        if data_collator is None:
            if tokenizer is None:
                raise ValueError("The default RewardDataCollatorWithPadding needs a tokenizer (for its pad token).")
            if args.max_length is None:
                warnings.warn(
                    "When using RewardDataCollatorWithPadding, you should set `max_length` in RewardConfig. It will be "
                    "set to `512` by default, but you should do it yourself in the future.", UserWarning,
                )
            if args.remove_unused_columns:
                args = dataclasses.replace(args, remove_unused_columns=False)
                warnings.warn(
                    "When using RewardDataCollatorWithPadding, you should set `remove_unused_columns=False` in your "
                    "RewardConfig; we have set it for you, but you should do it yourself in the future.", UserWarning,
                )
            D.ensure_pad_token(tokenizer)
            data_collator = D.RewardDataCollatorWithPadding(
                tokenizer, max_length=args.max_length or 512, pad_to_multiple_of=args.pad_to_multiple_of
            )
        for ds, which in ((train_dataset, "train"), (eval_dataset, "eval")):
            for one in (ds.values() if isinstance(ds, dict) else [ds]):
                if one is not None:
                    _check_columns(one, which)
        module, params = as_score_model(model, params, seed=args.seed)
        wrapper = model_object_of(model)
        if wrapper is not None and wrapper.module is not module:  # a causal LM turned into a score model
            wrapper = None
        module, params, peft_model = apply_peft(module, params, peft_config, "RewardTrainer")
        wrapper = peft_model if peft_model is not None else wrapper
        super().__init__(
            module, params, args, train_dataset, eval_dataset, mesh=mesh, model_object=wrapper, callbacks=callbacks,
            compute_metrics=compute_metrics, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.tokenizer = tokenizer
        self.data_collator = data_collator
        self.loss_fn = make_reward_loss(self.compute_module)
        self.predict_fn = make_reward_predict(self.compute_module)
        self._score = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask).logits)

    def compute_loss(self, model: Any, inputs: Dict[str, Any], return_outputs: bool = False):
        """TRL's ``compute_loss``: ``loss`` (or ``(loss, {"rewards_chosen": [B, 1],
        "rewards_rejected": [B, 1]})``) for a collated batch. ``model``: ``trainer.model`` (the
        current params), a model object with ``.params``, or a params pytree."""
        if model is self.model or model is self.module:
            params = self.params
        elif hasattr(model, "params") and not isinstance(model, dict):
            params = model.params
        else:
            params = model
        chosen = self._score(params, jnp.asarray(inputs["input_ids_chosen"]), jnp.asarray(inputs["attention_mask_chosen"]))
        rejected = self._score(params, jnp.asarray(inputs["input_ids_rejected"]), jnp.asarray(inputs["attention_mask_rejected"]))
        loss = reward_loss(chosen, rejected, inputs.get("margin"))
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def collate(self, examples: Sequence[dict]) -> Dict[str, np.ndarray]:
        batch = dict(self.data_collator(list(examples)))
        batch.pop("return_loss", None)
        c, r = batch["input_ids_chosen"], batch["input_ids_rejected"]
        if c.shape[1] != r.shape[1]:  # a custom collator: give both sides one width
            width = max(c.shape[1], r.shape[1])
            left = getattr(self.tokenizer, "padding_side", "right") == "left"
            pad_id = getattr(self.tokenizer, "pad_token_id", 0) or 0
            for side in ("chosen", "rejected"):
                for k, value in ((f"input_ids_{side}", pad_id), (f"attention_mask_{side}", 0)):
                    x = np.asarray(batch[k])
                    extra = width - x.shape[1]
                    batch[k] = np.pad(x, ((0, 0), (extra, 0) if left else (0, extra)), constant_values=value)
        return batch

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval", *, ignore_keys=None) -> Dict[str, float]:
        """Mean loss and metrics over the eval set: ``eval_loss``, ``eval_accuracy`` (TRL's
        ``compute_accuracy``, ties count as correct), ``eval_accuracy_strict``,
        ``eval_rewards_chosen``, ``eval_rewards_rejected``, plus HF's ``eval_runtime`` /
        ``eval_samples_per_second`` / ``eval_steps_per_second``."""
        if eval_dataset is not None:
            for one in (eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]):
                _check_columns(one, "eval")
        return super().evaluate(eval_dataset, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """``PredictionOutput``: ``predictions [N, 2]`` (``softmax([r_chosen, r_rejected])``, as
        TRL), ``label_ids [N]`` (zeros), ``metrics`` (``test_loss``, ``test_accuracy``, ...)."""
        _check_columns(test_dataset, "test")
        return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def _save(self, output_dir: str) -> None:
        """HF ``*ForSequenceClassification`` directory (+ tokenizer). The tokenizer's pad id is
        written into config.json when the config has none: transformers' score head needs it
        to find the last token of padded rows."""
        from rljax.models import save_pretrained

        module = self.module
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if getattr(module.config, "pad_token_id", None) is None and pad_id is not None:
            module = module.clone(config=dataclasses.replace(module.config, pad_token_id=int(pad_id)))
        save_pretrained(module, self.params, output_dir, overwrite=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(output_dir)
