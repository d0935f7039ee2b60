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

import numpy as np

from rljax import data as D
from rljax.reward import as_score_model, make_reward_loss
from rljax.trainers.base import Trainer, TrainingArguments

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

    ``model``: see :func:`as_score_model`. Datasets carry TRL's tokenized columns
    (``input_ids_chosen``, ``attention_mask_chosen``, ``input_ids_rejected``,
    ``attention_mask_rejected``, optional ``margin``). ``data_collator`` defaults to
    :class:`rljax.data.RewardDataCollatorWithPadding` (bucketed static lengths).
    """

    def __init__(
        self,
        model: Any = None,
        args: Optional[RewardConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        params: Any = None,
        mesh: Any = None,
        max_length: Optional[int] = None,
        model_init: Any = None,
        compute_metrics: Optional[Callable] = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        peft_config: Any = None,
    ):
        for name, value in (("model_init", model_init), ("compute_metrics", compute_metrics), ("callbacks", callbacks),
                            ("preprocess_logits_for_metrics", preprocess_logits_for_metrics), ("peft_config", peft_config)):
            if value is not None:
                raise ValueError(f"{name} is not supported by rljax's RewardTrainer.")
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError("custom optimizers are not supported; set the optimizer through RewardConfig (AdamW fields).")
        args = args if args is not None else RewardConfig()
        if not isinstance(args, RewardConfig):
            args = RewardConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)})
        if max_length is not None:
            if args.max_length is not None and args.max_length != max_length:
                raise ValueError("max_length is set both on RewardTrainer and on RewardConfig; set it on RewardConfig only.")
            warnings.warn("RewardTrainer(max_length=...) is deprecated in TRL; set RewardConfig.max_length.", FutureWarning)
            args = dataclasses.replace(args, max_length=max_length)
        if model is None:
            raise ValueError("RewardTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        if data_collator is None:
            if tokenizer is None:
                raise ValueError("The default RewardDataCollatorWithPadding needs a tokenizer (for its pad token).")
            D.ensure_pad_token(tokenizer)
            data_collator = D.RewardDataCollatorWithPadding(
                tokenizer, max_length=args.max_length or 512, pad_to_multiple_of=args.pad_to_multiple_of
            )
        for ds, which in ((train_dataset, "train"), (eval_dataset, "eval")):
            if ds is not None:
                _check_columns(ds, which)
        module, params = as_score_model(model, params, seed=args.seed)
        super().__init__(module, params, args, train_dataset, eval_dataset, mesh=mesh)
        self.tokenizer = tokenizer
        self.data_collator = data_collator
        self.loss_fn = make_reward_loss(module)

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

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Mean loss and metrics over the eval set: ``eval_loss``, ``eval_accuracy``,
        ``eval_accuracy_strict``, ``eval_rewards_chosen``, ``eval_rewards_rejected``."""
        if eval_dataset is not None:
            _check_columns(eval_dataset, "eval")
        return super().evaluate(eval_dataset, metric_key_prefix)

    def _save(self, output_dir: str) -> None:
        """HF ``*ForSequenceClassification`` directory (+ tokenizer). The tokenizer's pad id is
        written into config.json when the config has none: transformers' score head needs it
        to find the last token of padded rows."""
        from rljax.models import save_pretrained

        module = self.model
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if getattr(module.config, "pad_token_id", None) is None and pad_id is not None:
            module = module.clone(config=dataclasses.replace(module.config, pad_token_id=int(pad_id)))
        save_pretrained(module, self.params, output_dir, overwrite=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(output_dir)
