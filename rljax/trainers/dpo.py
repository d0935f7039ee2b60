"""Direct Preference Optimisation: TRL 0.7.11's DPOTrainer over a pure, jitted train step.

The loss and the reference log-prob function come from the functional core, :mod:`rljax.dpo`.

Batch layout (every leaf leads with the pair axis ``B``, so gradient accumulation can
split it): ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``,
``rejected_*`` likewise (all ``[B, L]`` int32, one common ``L``), the two reference
log-prob vectors, and (decoder-only) ``chosen_completion_positions`` /
``rejected_completion_positions`` ``[B, W]``: the columns whose logits score a completion
token (:func:`rljax.dpo.add_completion_positions`; ``W`` bucketed like ``L``), so the LM head
of the policy and of the reference runs on those ``W`` columns only.

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
* ``peft_config=`` trains LoRA adapters (``rljax.models.peft``); without a ``ref_model`` the
  reference is the policy with its adapters disabled (TRL's ``null_ref_context``).
* Encoder-decoder models (T5, ``rljax.models.AutoModelForSeq2SeqLM``) follow TRL's
  ``is_encoder_decoder`` path (see :mod:`rljax.dpo`): the prompt is the encoder input
  (tokenized with special tokens, cut to ``max_prompt_length``), chosen / rejected are the
  decoder labels (with special tokens, cut to ``max_target_length``), right-padded.
  ``is_encoder_decoder=`` is read from the model; a value that contradicts it raises.
  The encoder runs once per prompt (TRL runs it twice, on the prompt repeated; same numbers).
* A tokenizer without a pad token (and no ``padding_value``) fails when the trainer is
  built, with TRL's message (TRL raises it at the first collation, inside ``train()``).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax import data as D
from rljax.dpo import (
    _PAIR_KEYS,
    _SEQ2SEQ_KEYS,
    add_completion_positions,
    concatenated_forward,
    get_batch_logps,
    make_dpo_loss,
    make_reference_logps_fn,
    seq2seq_batch_logps,
    seq2seq_concatenated_forward,
)
from rljax.losses import DPO_LOSS_TYPES, dpo_loss
from rljax.trainers.base import (
    Trainer,
    TrainingArguments,
    apply_overrides,
    model_object_of,
    apply_peft,
    module_in_dtype,
    resolve_model,
    resolve_tokenizer,
)
from rljax.models.peft import is_peft_module, with_adapters_enabled

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
    max_target_length: Optional[int] = None  # encoder-decoder only: labels cut to this (None: 128, warned)
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

_PAD_TOKEN_MESSAGE = (
    "Padding is enabled, but the tokenizer is not configured with a padding token. Explicitly set "
    "`tokenizer.pad_token` (e.g. `tokenizer.pad_token = tokenizer.eos_token`) before calling the trainer."
)


def _is_seq2seq_checkpoint(path: str) -> bool:
    """Whether the checkpoint at ``path`` is an encoder-decoder (its config.json says so)."""
    from rljax.models.hub import read_checkpoint

    try:
        _, cfg = read_checkpoint(path)
    except Exception:  # noqa: BLE001 - let the loader raise its own, clearer error
        return False
    return bool(cfg.get("is_encoder_decoder")) or cfg.get("model_type") in ("t5", "mt5")


def _load_causal_lm(path: str, init_kwargs: Optional[dict], which: str):
    """A model id/path -> an ``rljax.models.AutoModelForCausalLM`` object (TRL: AutoModelForCausalLM
    .from_pretrained(path, **init_kwargs)), or an ``AutoModelForSeq2SeqLM`` for an encoder-decoder
    checkpoint (TRL would fail there); ``(module, params)`` when those classes are unavailable."""
    seq2seq = _is_seq2seq_checkpoint(path)
    cls_name = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    warnings.warn(f"You passed a {which} id to the DPOTrainer. This will automatically create an `{cls_name}` for you.",
                  UserWarning)
    try:
        from rljax.models import auto
    except ImportError:
        return resolve_model(path, model_init_kwargs=init_kwargs)
    return getattr(auto, cls_name).from_pretrained(path, **(init_kwargs or {}))


class Seq2SeqDPODataCollator:
    """TRL's ``DPODataCollatorWithPadding(is_encoder_decoder=True)`` with bucketed static widths:
    ``prompt_input_ids`` (pad ``pad_token_id``), ``prompt_attention_mask`` (pad 0) and
    ``chosen_labels`` / ``rejected_labels`` (pad ``label_pad_token_id``, one common width) become
    RIGHT-padded ``[batch, L]`` int32 arrays; ``*_decoder_input_ids`` rows (TRL's
    ``tokenize_row(feature, model)``) are dropped, the forward derives them from the labels;
    ``*_logps`` become float32 ``[batch]``; any other key stays a list."""

    def __init__(self, pad_token_id: Optional[int] = 0, label_pad_token_id: int = -100, *,
                 max_prompt_length: Optional[int] = None, max_target_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.label_pad_token_id = label_pad_token_id
        self.max_prompt_length, self.max_target_length = max_prompt_length, max_target_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        if self.pad_token_id is None:
            raise ValueError(_PAD_TOKEN_MESSAGE)
        multiple = D.DEFAULT_PAD_MULTIPLE if self.pad_to_multiple_of is None else int(self.pad_to_multiple_of)

        def width(keys, cap):
            return D.bucket_length(max((len(f[k]) for f in features for k in keys), default=0), multiple, cap)

        p_len = width(["prompt_input_ids"], self.max_prompt_length)
        l_len = width(["chosen_labels", "rejected_labels"], self.max_target_length)
        batch: Dict[str, Any] = {}
        for k in features[0].keys():
            values = [f[k] for f in features]
            if k == "prompt_input_ids":
                batch[k] = D.pad_sequences(values, self.pad_token_id, "right", p_len)
            elif k == "prompt_attention_mask":
                batch[k] = D.pad_sequences(values, 0, "right", p_len)
            elif k in ("chosen_labels", "rejected_labels"):
                batch[k] = D.pad_sequences(values, self.label_pad_token_id, "right", l_len)
            elif k.endswith("_decoder_input_ids"):
                continue
            elif k.endswith("_logps"):
                batch[k] = np.asarray(values, dtype=np.float32)
            else:
                batch[k] = values
        return batch


def seq2seq_dpo_tokenize_row(feature: Dict[str, Any], tokenizer: Any, *, max_prompt_length: int = 128,
                             max_target_length: int = 128, model: Any = None) -> Dict[str, List[int]]:
    """TRL 0.7.11 ``DPOTrainer.tokenize_row`` with ``is_encoder_decoder``: the prompt -> encoder
    ``prompt_input_ids`` / ``prompt_attention_mask`` (special tokens added, cut to
    ``max_prompt_length``); chosen / rejected -> ``chosen_labels`` / ``rejected_labels``
    (special tokens added, cut to ``max_target_length``). With ``model`` (an encoder-decoder with
    a ``config``) also ``{chosen,rejected}_decoder_input_ids``: the labels shifted right behind
    the decoder start token (TRL: ``model.prepare_decoder_input_ids_from_labels``)."""
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(feature[name], str):
            raise ValueError(f"{name} should be an str but got {type(feature[name])}")
    chosen = tokenizer(feature["chosen"], truncation=True, max_length=max_target_length, add_special_tokens=True)
    rejected = tokenizer(feature["rejected"], truncation=True, max_length=max_target_length, add_special_tokens=True)
    prompt = tokenizer(feature["prompt"], truncation=True, max_length=max_prompt_length, add_special_tokens=True)
    out = {
        "chosen_labels": list(chosen["input_ids"]),
        "rejected_labels": list(rejected["input_ids"]),
        "prompt_input_ids": list(prompt["input_ids"]),
        "prompt_attention_mask": list(prompt["attention_mask"]),
    }
    config = getattr(getattr(model, "module", model), "config", None)
    if config is not None and getattr(config, "decoder_start_token_id", None) is not None:
        for side in ("rejected", "chosen"):
            labels = out[f"{side}_labels"]
            out[f"{side}_decoder_input_ids"] = [config.decoder_start_token_id] + [
                config.pad_token_id if t == -100 else t for t in labels[:-1]]
    return out


class DPOTrainer(Trainer):
    """TRL's DPOTrainer: ``DPOTrainer(model, ref_model, beta=0.1, args=..., train_dataset=..., tokenizer=...)``.

    ``model`` / ``ref_model``: a model id/path (loaded with ``model_init_kwargs`` /
    ``ref_model_init_kwargs``), a model object with ``.module``/``.params`` (e.g.
    ``rljax.models.AutoModelForCausalLM``; it gets the trained params at the end of
    ``train()`` and is ``trainer.model``), ``(module, params)``, or a flax module with
    ``params=`` / ``ref_params=``. Without a reference model (and without ``ref_params``) the
    reference is a frozen copy of the policy's initial params (TRL's ``create_reference_model``;
    with ``precompute_ref_log_probs`` TRL's reference forward also runs on the initial policy).
    The reference is never trained: its params are passed to a separate jitted forward, not to
    the optimizer.

    Datasets have string columns ``prompt``, ``chosen``, ``rejected`` (tokenized here as
    TRL's ``tokenize_row``); ``eval_dataset`` may be a dict of such datasets. Options TRL takes
    as keyword arguments (beta, loss_type, max_length, precompute_ref_log_probs, ...) may be
    given here or on ``DPOConfig`` (keywords win). ``callbacks`` / ``optimizers`` /
    ``compute_metrics`` / ``preprocess_logits_for_metrics``: see
    :class:`rljax.trainers.base.Trainer` (predictions are TRL's per-batch
    ``[logits/chosen, logits/rejected]`` means, labels 0). ``peft_config``: LoRA adapters
    (reference = adapters off when no ref model is given); the adapter names must be None.
    Encoder-decoder models (T5, e.g. ``rljax.models.AutoModelForSeq2SeqLM``) take TRL's
    encoder-decoder path (module docstring); ``is_encoder_decoder`` is read from the model.
    """

    _tag_names = ["trl", "dpo"]

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
        model_init: Optional[Callable[[], Any]] = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        max_length: Optional[int] = None,
        max_prompt_length: Optional[int] = None,
        max_target_length: Optional[int] = None,
        peft_config: Any = None,
        is_encoder_decoder: Optional[bool] = None,
        disable_dropout: Optional[bool] = None,
        generate_during_eval: Optional[bool] = None,
        compute_metrics: Optional[Callable] = None,
        precompute_ref_log_probs: Optional[bool] = None,
        dataset_num_proc: Optional[int] = None,  # accepted for TRL compatibility; tokenization is sequential
        model_init_kwargs: Optional[dict] = None,
        ref_model_init_kwargs: Optional[dict] = None,
        model_adapter_name: Optional[str] = None,
        ref_adapter_name: Optional[str] = None,
        reference_free: Optional[bool] = None,
        params: Any = None,
        mesh: Any = None,
        ref_params: Any = None,
    ):
        if model_init_kwargs is not None and not isinstance(model, str):
            raise ValueError("You passed model_init_kwargs to the DPOTrainer, but your model is already instantiated.")
        if ref_model_init_kwargs is not None and not isinstance(ref_model, str):
            raise ValueError("You passed ref_model_init_kwargs to the DPOTrainer, but your ref_model is already instantiated.")
        for name, value in (("model_adapter_name", model_adapter_name), ("ref_adapter_name", ref_adapter_name)):
            if value is not None:
                raise ValueError(f"DPOTrainer: {name} names a second PEFT adapter; rljax models hold one adapter "
                                 "(the reference is the model with it disabled), pass None.")
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
                "Weights & Biases. Set it to False and sample with rljax.generation.generate(trainer.module, "
                "trainer.params, ...) if you want to inspect generations."
            )
        if model is None and model_init is not None:
            model = model_init()
        if model is None:
            raise ValueError("DPOTrainer needs a model (checkpoint path, (module, params), or a loaded model).")
        tokenizer = resolve_tokenizer(model, tokenizer, "tokenizer must be specified to tokenize a DPO dataset.")
        if isinstance(model, str):
            model = _load_causal_lm(model, model_init_kwargs, "model")
        if isinstance(ref_model, str):
            ref_model = _load_causal_lm(ref_model, ref_model_init_kwargs, "ref_model")
        module, params = resolve_model(model, params)
        encoder_decoder = bool(getattr(module, "is_encoder_decoder", False))
        if is_encoder_decoder is not None and bool(is_encoder_decoder) != encoder_decoder:
            raise ValueError(
                f"is_encoder_decoder={is_encoder_decoder} contradicts the model, which is "
                f"{'an encoder-decoder' if encoder_decoder else 'decoder-only'} ({type(module).__name__}); TRL reads it "
                "from model.config when a model is given: pass is_encoder_decoder=None."
            )
        if args.max_length is None:
            warnings.warn("`max_length` is not set in the DPOTrainer's init; it will default to 512 (TRL's default), "
                          "but you should set it yourself.", UserWarning)
            args = dataclasses.replace(args, max_length=512)
        if args.max_prompt_length is None:
            warnings.warn("`max_prompt_length` is not set in the DPOTrainer's init; it will default to 128 (TRL's "
                          "default), but you should set it yourself.", UserWarning)
            args = dataclasses.replace(args, max_prompt_length=128)
        if encoder_decoder and args.max_target_length is None:
            warnings.warn("When using an encoder decoder architecture, you should set `max_target_length` in the "
                          "DPOTrainer's init; it will default to 128 (TRL's default), but you should set it yourself.",
                          UserWarning)
            args = dataclasses.replace(args, max_target_length=128)
        if not encoder_decoder and args.max_length <= args.max_prompt_length:
            raise ValueError(
                f"max_length={args.max_length} must exceed max_prompt_length={args.max_prompt_length}: no completion "
                "token would survive truncation, so the loss would sit at log 2 and nothing would train. Raise "
                "max_length or lower max_prompt_length."
            )
        if args.label_smoothing > 0 and args.loss_type != "sigmoid":
            warnings.warn(f"label_smoothing is ignored by the {args.loss_type!r} loss (TRL honours it for 'sigmoid' only).")
        if args.padding_value is None:
            if getattr(tokenizer, "pad_token_id", None) is None:
                raise ValueError(_PAD_TOKEN_MESSAGE)
            args = dataclasses.replace(args, padding_value=int(tokenizer.pad_token_id))
        if data_collator is None and args.remove_unused_columns:
            args = dataclasses.replace(args, remove_unused_columns=False)
            warnings.warn(
                "When using DPODataCollatorWithPadding, you should set `remove_unused_columns=False` in your "
                "TrainingArguments; we have set it for you, but you should do it yourself in the future.", UserWarning,
            )

        module, params, peft_model = apply_peft(module, params, peft_config, "DPOTrainer")
        model_object = peft_model if peft_model is not None else model_object_of(model)
        self._ref_is_policy = False
        if ref_model is not None:
            ref_module, ref_params = resolve_model(ref_model, ref_params)
            if bool(getattr(ref_module, "is_encoder_decoder", False)) != encoder_decoder:
                raise ValueError(f"ref_model ({type(ref_module).__name__}) and model ({type(module).__name__}) must both "
                                 "be encoder-decoders or both decoder-only.")
        elif is_peft_module(module) and ref_params is None:
            # TRL's null_ref_context: the policy with its adapters disabled, on the policy's own
            # (current) params; the frozen base is never copied.
            ref_module, ref_params, self._ref_is_policy = with_adapters_enabled(module, False), None, True
        else:  # create_reference_model semantics: the initial policy, frozen (jax arrays are immutable)
            ref_module, ref_params = module, (ref_params if ref_params is not None else params)
        super().__init__(
            module, params, args, None, None, mesh=mesh, model_object=model_object, callbacks=callbacks,
            compute_metrics=compute_metrics, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.tokenizer = tokenizer
        self.ref_model = ref_model if ref_model is not None else None
        self.ref_module = ref_module
        self.ref_params = ref_params
        if mesh is not None and ref_params is not None:  # the reference is sharded by its family's rules, like the policy (a copy: the step donates)
            from rljax.sharding import shard_params

            self.ref_params = shard_params(ref_params, mesh, copy=True)
        self.beta, self.label_smoothing, self.loss_type = args.beta, args.label_smoothing, args.loss_type
        self.label_pad_token_id, self.padding_value = args.label_pad_token_id, args.padding_value
        self.max_length, self.max_prompt_length = args.max_length, args.max_prompt_length
        self.truncation_mode, self.precompute_ref_log_probs = args.truncation_mode, args.precompute_ref_log_probs
        self.reference_free, self.is_encoder_decoder = args.reference_free, encoder_decoder
        self.max_target_length = args.max_target_length
        self.dataset_num_proc = dataset_num_proc
        self.use_dpo_data_collator = data_collator is None
        if data_collator is not None:
            self.data_collator = data_collator
        elif encoder_decoder:  # TRL pads the encoder prompt with the tokenizer's pad id
            self.data_collator = Seq2SeqDPODataCollator(
                tokenizer.pad_token_id, args.label_pad_token_id, max_prompt_length=args.max_prompt_length,
                max_target_length=args.max_target_length, pad_to_multiple_of=args.pad_to_multiple_of,
            )
        else:
            self.data_collator = D.DPODataCollatorWithPadding(
                args.padding_value, args.label_pad_token_id, max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self.loss_fn = make_dpo_loss(
            self.compute_module, beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
            reference_free=args.reference_free, label_pad_token_id=args.label_pad_token_id,
            disable_dropout=args.disable_dropout,
        )
        self.predict_fn = self._make_predict_fn()
        ref_compute = module_in_dtype(ref_module, jnp.bfloat16) if args.bf16 and ref_module is not None else ref_module
        self._reference_logps = make_reference_logps_fn(
            ref_compute, average_log_prob=args.loss_type == "ipo", label_pad_token_id=args.label_pad_token_id, mesh=mesh
        )
        self.train_dataset = self.tokenize_dataset(train_dataset) if train_dataset is not None else None
        self.eval_dataset = self._tokenize_eval(eval_dataset) if eval_dataset is not None else None
        self._precomputed_train = False
        self._precomputed_eval = False

    def _ref_params_now(self) -> Any:
        """The reference's params: its own, or (PEFT without a ref model) the policy's current
        params, read with adapters off."""
        return self.params if self._ref_is_policy else self.ref_params

    def _make_predict_fn(self) -> Callable:
        loss_fn = self.loss_fn

        def predict(params, batch):
            # TRL's prediction_step: per batch, [mean chosen logits, mean rejected logits], labels 0.
            loss, metrics = loss_fn(params, batch, None)
            preds = jnp.stack([metrics["logits/chosen"], metrics["logits/rejected"]])
            return dict(metrics, loss=loss), preds, jnp.zeros((2,), jnp.int32)

        return predict

    def _tokenize_eval(self, dataset: Any) -> Any:
        if isinstance(dataset, dict):
            return {name: self.tokenize_dataset(ds) for name, ds in dataset.items()}
        return self.tokenize_dataset(dataset)

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
        rows = []
        for row in dataset:
            toks = self.tokenize_row(row)
            for k in _REF_KEYS:  # a dataset that already carries reference log-probs keeps them
                if k in row:
                    toks[k] = float(row[k])
            rows.append(toks)
        return rows

    def _pad_pairs(self, examples: Sequence[dict]) -> Dict[str, np.ndarray]:
        """Collate rows and give chosen and rejected one common (bucketed) width."""
        b = self.data_collator(list(examples))
        a = self.args
        if self.is_encoder_decoder:
            return self._pair_batch(b)
        cat = D.concatenated_inputs(b, a.padding_value, a.label_pad_token_id)
        n = len(examples)
        batch = {}
        for k in ("input_ids", "attention_mask", "labels"):
            batch[f"chosen_{k}"] = cat[f"concatenated_{k}"][:n]
            batch[f"rejected_{k}"] = cat[f"concatenated_{k}"][n:]
        for k in _REF_KEYS:
            if k in b:
                batch[k] = np.asarray(b[k], np.float32)
        # the columns whose logits count: the policy's and the reference's LM head run there only
        return add_completion_positions(batch, a.label_pad_token_id, a.pad_to_multiple_of)

    def collate(self, examples: Sequence[dict]) -> Dict[str, Any]:
        """Pad a list of token rows; add the reference log-probs unless precomputed."""
        batch = self._pad_pairs(examples)
        if not all(k in batch for k in _REF_KEYS):
            rc, rr = self._reference_logps(self._ref_params_now(), batch)
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
            rc, rr = jax.device_get(self._reference_logps(self._ref_params_now(), batch))
            for i, r in enumerate(rows):
                out.append(dict(r, reference_chosen_logps=float(rc[i]), reference_rejected_logps=float(rr[i])))
        return out

    # -- TRL's method names ------------------------------------------------------------------
    def tokenize_row(self, feature: Dict[str, Any], model: Any = None) -> Dict[str, Any]:
        """TRL's ``tokenize_row``: one prompt/chosen/rejected row -> token fields (encoder-decoder:
        :func:`seq2seq_dpo_tokenize_row`, with decoder inputs when ``model`` is given)."""
        a = self.args
        if self.is_encoder_decoder:
            return seq2seq_dpo_tokenize_row(feature, self.tokenizer, max_prompt_length=a.max_prompt_length,
                                            max_target_length=a.max_target_length, model=model)
        return D.dpo_tokenize_row(
            feature, self.tokenizer, max_length=a.max_length, max_prompt_length=a.max_prompt_length,
            truncation_mode=a.truncation_mode, label_pad_token_id=a.label_pad_token_id,
        )

    @staticmethod
    def concatenated_inputs(batch: Dict[str, Any], is_encoder_decoder: bool = False, label_pad_token_id: int = -100,
                            padding_value: int = 0, device: Any = None) -> Dict[str, np.ndarray]:
        """TRL's ``concatenated_inputs``: chosen rows then rejected rows, padded to one width.
        ``is_encoder_decoder``: ``concatenated_labels`` (and any other ``chosen_*`` array, padded
        with ``label_pad_token_id`` as TRL) to the longer label width, and the prompt repeated
        twice as ``concatenated_input_ids`` / ``concatenated_attention_mask``."""
        if not is_encoder_decoder:
            return D.concatenated_inputs(batch, padding_value, label_pad_token_id)
        width = max(np.shape(batch["chosen_labels"])[1], np.shape(batch["rejected_labels"])[1])
        out = {}
        for k, v in batch.items():
            rk = "rejected" + k[len("chosen"):]
            if k.startswith("chosen") and np.ndim(v) == 2 and rk in batch:
                out["concatenated" + k[len("chosen"):]] = np.concatenate(
                    [np.pad(np.asarray(x), ((0, 0), (0, width - np.shape(x)[1])), constant_values=label_pad_token_id)
                     for x in (v, batch[rk])], axis=0)
        out["concatenated_input_ids"] = np.tile(np.asarray(batch["prompt_input_ids"]), (2, 1))
        out["concatenated_attention_mask"] = np.tile(np.asarray(batch["prompt_attention_mask"]), (2, 1))
        return out

    @staticmethod
    def get_batch_logps(logits: jax.Array, labels: jax.Array, average_log_prob: bool = False,
                        label_pad_token_id: int = -100, is_encoder_decoder: bool = False) -> jax.Array:
        """TRL's ``get_batch_logps``: ``[B]`` summed (or averaged) log-probs of the labels (no
        shift for ``is_encoder_decoder``: :func:`rljax.dpo.seq2seq_batch_logps`)."""
        if is_encoder_decoder:
            return seq2seq_batch_logps(logits, labels, average_log_prob, label_pad_token_id)
        return get_batch_logps(logits, labels, average_log_prob, label_pad_token_id)

    def dpo_loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 reference_free: bool = False):
        """TRL's ``dpo_loss`` with this trainer's beta / label_smoothing / loss_type: ``(losses [B],
        chosen_rewards [B], rejected_rewards [B])``."""
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=self.beta, label_smoothing=self.label_smoothing if self.loss_type == "sigmoid" else 0.0,
            loss_type=self.loss_type, reference_free=reference_free,
        )

    def _params_of(self, model: Any) -> Any:
        if model is None or model is self.model or model is self.module:
            return self.params
        if hasattr(model, "params") and not isinstance(model, dict):
            return model.params
        return model  # a params pytree

    def _pair_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A TRL-collated batch (chosen/rejected of different widths) or ours -> our layout."""
        if self.is_encoder_decoder:
            return self._seq2seq_pair_batch(batch)
        if "concatenated_input_ids" in batch or batch["chosen_input_ids"].shape[1] != batch["rejected_input_ids"].shape[1]:
            cat = batch if "concatenated_input_ids" in batch else D.concatenated_inputs(
                batch, self.padding_value, self.label_pad_token_id)
            n = cat["concatenated_input_ids"].shape[0] // 2
            out = {f"{side}_{k}": cat[f"concatenated_{k}"][sl] for side, sl in (("chosen", slice(None, n)), ("rejected", slice(n, None)))
                   for k in ("input_ids", "attention_mask", "labels")}
            return {**{k: v for k, v in batch.items() if k in _REF_KEYS}, **out}
        return batch

    def _seq2seq_pair_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Encoder-decoder: prompt rows plus chosen / rejected labels of one common width (from
        ours, TRL's collated batch, or TRL's ``concatenated_*`` batch)."""
        refs = {k: v for k, v in batch.items() if k in _REF_KEYS}
        if "concatenated_labels" in batch:
            n = np.shape(batch["concatenated_labels"])[0] // 2
            return {**refs, "prompt_input_ids": batch["concatenated_input_ids"][:n],
                    "prompt_attention_mask": batch["concatenated_attention_mask"][:n],
                    "chosen_labels": batch["concatenated_labels"][:n], "rejected_labels": batch["concatenated_labels"][n:]}
        missing = [k for k in _SEQ2SEQ_KEYS if k not in batch]
        if missing:
            raise ValueError(f"An encoder-decoder DPO batch needs {list(_SEQ2SEQ_KEYS)}; missing {missing}.")
        c, r = np.asarray(batch["chosen_labels"]), np.asarray(batch["rejected_labels"])
        width = max(c.shape[1], r.shape[1])
        pad = self.label_pad_token_id
        c, r = (np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=pad) for x in (c, r))
        mask = np.asarray(batch["prompt_attention_mask"])
        return {**refs, "prompt_input_ids": np.asarray(batch["prompt_input_ids"]), "prompt_attention_mask": mask,
                "chosen_labels": c, "rejected_labels": r}

    def concatenated_forward(self, model: Any, batch: Dict[str, Any]):
        """TRL's ``concatenated_forward``: ``(chosen_logps [B], rejected_logps [B], chosen_logits
        [B, L, V], rejected_logits [B, L, V])`` of ``model`` (``trainer.model``, a model object,
        or a params pytree) on a collated batch."""
        batch = self._pair_batch(batch)
        kw = {"average_log_prob": self.loss_type == "ipo", "label_pad_token_id": self.label_pad_token_id}
        if self.is_encoder_decoder:
            return seq2seq_concatenated_forward(
                self.module, self._params_of(model), {k: jnp.asarray(batch[k]) for k in _SEQ2SEQ_KEYS}, **kw)
        pc, pr, logits = concatenated_forward(
            self.module, self._params_of(model), {k: jnp.asarray(batch[k]) for k in _PAIR_KEYS}, **kw)
        n = pc.shape[0]
        return pc, pr, logits[:n], logits[n:]

    def compute_reference_log_probs(self, padded_batch: Dict[str, Any]):
        """TRL's ``compute_reference_log_probs``: ``(reference_chosen_logps [B], reference_rejected_logps [B])``."""
        return self._reference_logps(self._ref_params_now(), self._pair_batch(padded_batch))

    def get_batch_loss_metrics(self, model: Any, batch: Dict[str, Any], train_eval: str = "train"):
        """TRL's ``get_batch_loss_metrics``: ``(loss, metrics)`` with TRL's keys (``eval_`` prefixed
        for ``train_eval="eval"``); reference log-probs from the batch or the reference model."""
        batch = self._pair_batch(batch)
        if not all(k in batch for k in _REF_KEYS):
            rc, rr = self._reference_logps(self._ref_params_now(), batch)
            batch = dict(batch, reference_chosen_logps=rc, reference_rejected_logps=rr)
        loss, metrics = jax.jit(self.loss_fn)(self._params_of(model), {k: jnp.asarray(v) for k, v in batch.items()}, None)
        prefix = "eval_" if train_eval == "eval" else ""
        return loss, {f"{prefix}{k}": float(v) for k, v in metrics.items()}

    # -- loop -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, **kwargs: Any):
        """HF ``Trainer.train`` (see :meth:`rljax.trainers.base.Trainer.train`); with
        ``precompute_ref_log_probs`` the reference log-probs of the whole train set are computed
        once first."""
        if self.args.precompute_ref_log_probs and not self._precomputed_train and self.train_dataset:
            self.train_dataset = self.precompute_reference_logps(self.train_dataset, self.args.per_device_train_batch_size)
            self._precomputed_train = True
        return super().train(resume_from_checkpoint, **kwargs)

    def _prepare_eval(self, ds: Any) -> Any:
        if isinstance(ds, dict):
            return {name: self._prepare_eval(one) for name, one in ds.items()}
        if self.args.precompute_ref_log_probs:
            return self.precompute_reference_logps(ds, self.args.per_device_eval_batch_size)
        return ds

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval", *, ignore_keys=None) -> Dict[str, float]:
        """Mean DPO loss and metrics over the eval set (keys ``eval_loss``, ``eval_rewards/chosen``,
        ..., HF's ``eval_runtime``...). ``eval_dataset``: text rows (prompt/chosen/rejected) or a
        dict of such datasets, tokenized here; None uses the trainer's."""
        if eval_dataset is not None:
            ds = self._prepare_eval(self._tokenize_eval(eval_dataset))
        else:
            if not self._precomputed_eval and self.eval_dataset:
                self.eval_dataset = self._prepare_eval(self.eval_dataset)
                self._precomputed_eval = True
            ds = self.eval_dataset
        return super().evaluate(ds, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """HF ``predict`` on text rows: metrics prefixed ``test_``; predictions are TRL's per-batch
        ``[logits/chosen, logits/rejected]`` means."""
        return super().predict(self._prepare_eval(self.tokenize_dataset(test_dataset)), ignore_keys, metric_key_prefix)

    def _save(self, output_dir: str) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir, overwrite=True)
        self.tokenizer.save_pretrained(output_dir)
