"""What every supervised-style trainer shares: TrainingArguments (HF field names and
defaults), the optimizer/schedule, a jitted train-step builder with gradient
accumulation, and the ``Trainer`` shell loop with HF Trainer semantics (TrainerState and
log_history, callbacks, evaluation, checkpoints, the end-of-training summary).

SFT, reward modelling and DPO only supply a loss function and a collator.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax.data import BatchIterator
from rljax.train_state import TrainState

LossFn = Callable[[Any, Dict[str, jax.Array], jax.Array], tuple]  # (params, batch, rng) -> (loss, metrics)


@dataclasses.dataclass
class TrainingArguments:
    """The subset of ``transformers.TrainingArguments`` (4.38) that rljax trainers honour,
    with the same names and defaults."""

    output_dir: str = "runs/rljax"
    """Directory for metrics.jsonl, checkpoints (checkpoint-<step>/) and the saved model."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only; no biases or norm scales)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm (None or 0: no clipping)."""
    num_train_epochs: float = 3.0
    """Epochs over the training set (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer updates; overrides num_train_epochs when > 0."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule (HF names): linear, cosine, cosine_with_restarts, polynomial, constant,
    constant_with_warmup or inverse_sqrt."""
    warmup_ratio: float = 0.0
    """Fraction of the updates spent warming up (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Linear warm-up updates (overrides warmup_ratio)."""
    per_device_train_batch_size: int = 8
    """Examples per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Examples per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are averaged per update."""
    logging_steps: int = 500
    """Log metrics every N updates (and at the last one)."""
    logging_strategy: str = "steps"  # "no" | "steps" | "epoch"
    """When to log training metrics: no, steps (every logging_steps) or epoch."""
    logging_first_step: bool = False
    """Also log after the first update."""
    evaluation_strategy: str = "no"  # "no" | "steps" | "epoch"
    """When to evaluate: no, steps (every eval_steps) or epoch."""
    eval_steps: Optional[int] = None
    """Evaluate every N updates (None: logging_steps)."""
    save_strategy: str = "steps"  # "no" | "steps" | "epoch"
    """When to checkpoint: no, steps (every save_steps) or epoch."""
    save_steps: int = 500
    """Checkpoint every N updates (HF model + resumable train state in checkpoint-<step>/)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoint-<step>/ directories: the oldest are deleted after a new one is
    fully written (None or <= 0: keep all)."""
    seed: int = 42
    """Seed for parameter init, dropout and data order."""
    remove_unused_columns: bool = True
    """HF drops dataset columns the model's forward does not take; rljax collators read only the
    columns they need, so extra columns are ignored either way (RewardTrainer/DPOTrainer warn and
    set it to False as TRL does)."""
    optim: str = "adamw_torch"
    """Optimizer, by HF name, mapped to optax (see OPTIMIZERS): the adamw_* family, adafactor, sgd,
    adagrad, rmsprop and lion. 8-bit variants keep float32 state (a warning says so)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory: each transformer block is rematerialised in the backward pass
    (``nn.remat`` per block, the model config's ``remat_policy``); models without per-block
    options rematerialise the whole loss (jax.checkpoint)."""
    gradient_checkpointing_kwargs: Optional[Union[dict, str]] = None
    """HF's torch.utils.checkpoint options: use_reentrant is accepted (it has no JAX meaning); rljax adds
    ``policy``: "full" (default: keep only each block's input) or "dots" (also keep matmul outputs)."""
    report_to: Optional[List[str]] = None
    """Extra metric sinks besides metrics.jsonl: tensorboard, wandb, stdout, all or none."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    bf16: bool = False
    """Mixed precision as HF's bf16 autocast: the forward runs in bfloat16 (params cast inside the
    loss), master params, gradients, optimizer state and losses stay float32."""
    dataloader_drop_last: bool = False
    """Accepted for HF compatibility (training batches always drop the last partial one)."""
    run_name: Optional[str] = None
    """Run name for the report_to sinks (W&B run / TensorBoard project); None: the trainer's class name."""
    push_to_hub: bool = False
    """rljax runs offline: True raises a ValueError (save with save_model and upload yourself)."""
    hub_model_id: Optional[str] = None
    """Accepted for HF compatibility (used only with push_to_hub, which is refused)."""
    ddp_find_unused_parameters: Optional[bool] = None
    """Accepted for HF compatibility: a torch DDP option; JAX gives unused params zero gradients."""
    resume_from_checkpoint: Optional[str] = None
    """A checkpoint-<step> directory (or a directory holding them: the newest) to resume training from;
    train() uses it when called without resume_from_checkpoint (HF scripts pass it to train() themselves)."""

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"Unknown lr_scheduler_type {self.lr_scheduler_type!r}; choose one of {sorted(SCHEDULES)}.")
        for name in ("evaluation_strategy", "save_strategy", "logging_strategy"):
            if getattr(self, name) not in ("no", "steps", "epoch"):
                raise ValueError(f"{name} must be 'no', 'steps' or 'epoch', got {getattr(self, name)!r}.")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"Unknown optim {self.optim!r}; choose one of {sorted(OPTIMIZERS)}.")
        if isinstance(self.gradient_checkpointing_kwargs, str):  # HF accepts JSON on the command line
            self.gradient_checkpointing_kwargs = json.loads(self.gradient_checkpointing_kwargs)
        unknown = sorted(set(self.gradient_checkpointing_kwargs or {}) - {"use_reentrant", "policy"})
        if unknown:
            raise ValueError(
                f"gradient_checkpointing_kwargs {unknown} are not supported; only use_reentrant and policy "
                "(\"full\" or \"dots\") are accepted (rljax rematerialises each block with nn.remat)."
            )
        if (self.gradient_checkpointing_kwargs or {}).get("policy", "full") not in ("full", "dots"):
            raise ValueError(
                f"gradient_checkpointing_kwargs['policy'] must be 'full' or 'dots', got "
                f"{self.gradient_checkpointing_kwargs['policy']!r}."
            )
        if self.push_to_hub:
            raise ValueError(
                "push_to_hub=True: rljax runs offline and never uploads. Set push_to_hub=False, save with "
                "trainer.save_model(output_dir) and upload the directory yourself (e.g. `huggingface-cli upload`)."
            )
        from rljax.logging import resolve_sink_names

        resolve_sink_names(self.report_to)  # unknown sink names fail here, before any training

    @property
    def train_batch_size(self) -> int:
        """Examples per optimizer update (per_device_train_batch_size x gradient_accumulation_steps)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def eval_batch_size(self) -> int:
        """Examples per evaluation batch."""
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(num_training_steps * self.warmup_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Learning-rate schedules (transformers' get_scheduler, as optax schedules of the update count)
# --------------------------------------------------------------------------------------------


def _linear(lr, warmup, total):
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, 0.0, max(total - warmup, 1))],
        [warmup],
    ) if warmup > 0 else optax.linear_schedule(lr, 0.0, max(total, 1))


def _cosine(lr, warmup, total):
    decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup > 0 else decay


def _constant_with_warmup(lr, warmup, total):
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) if warmup > 0 else optax.constant_schedule(lr)


def _polynomial(lr, warmup, total, lr_end=1e-7, power=1.0):
    """HF's polynomial decay (lr_end=1e-7, power=1) from lr to lr_end after warmup."""
    decay = optax.polynomial_schedule(lr, min(lr_end, lr), power, max(total - warmup, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup > 0 else decay


def _inverse_sqrt(lr, warmup, total):
    """HF's inverse-sqrt schedule: linear warmup, then lr / sqrt((step + shift) / timescale) with
    timescale = warmup (10_000 without warmup)."""
    timescale = warmup or 10_000

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup, 1)
        decay = 1.0 / jnp.sqrt((count + timescale - warmup) / timescale)
        return lr * jnp.where(count < warmup, warm, decay)

    return schedule


SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine,  # HF's default num_cycles=1: one cosine decay, the same curve
    "polynomial": _polynomial,
    "constant": lambda lr, warmup, total: optax.constant_schedule(lr),
    "constant_with_warmup": _constant_with_warmup,
    "inverse_sqrt": _inverse_sqrt,
}


def make_schedule(args: TrainingArguments, num_training_steps: int, peak: Optional[float] = None) -> optax.Schedule:
    """HF's schedules: lr at update ``k`` (0-based) as transformers' LambdaLR gives it.
    ``peak`` replaces ``args.learning_rate`` (1.0 gives HF's multiplicative lr_lambda)."""
    lr = args.learning_rate if peak is None else peak
    return SCHEDULES[args.lr_scheduler_type](lr, args.get_warmup_steps(num_training_steps), num_training_steps)


def decay_mask(params: Any) -> Any:
    """HF AdamW's weight-decay set: every matrix (kernels, embeddings), no biases or norm scales."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


# --------------------------------------------------------------------------------------------
# Optimizers: HF's ``--optim`` names mapped to optax
# --------------------------------------------------------------------------------------------


def _adamw(args, lr):
    return optax.adamw(lr, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                       weight_decay=args.weight_decay, mask=decay_mask)


def _lion(args, lr):
    return optax.lion(lr, b1=args.adam_beta1, b2=args.adam_beta2, weight_decay=args.weight_decay, mask=decay_mask)


def _coupled_decay(args, tx):
    """torch SGD/Adagrad/RMSprop weight decay: ``grad += weight_decay * param`` (HF's decay set)."""
    if args.weight_decay:
        return optax.chain(optax.add_decayed_weights(args.weight_decay, decay_mask), tx)
    return tx


def _adafactor(args, lr):
    # HF: Adafactor(lr, scale_parameter=False, relative_step=False): factored second moments for
    # every matrix, update clipping at 1.0, decay_rate 0.8, no momentum; weight decay scaled by lr.
    rate = None
    if args.weight_decay:
        rate = (lambda count: args.weight_decay * lr(count)) if callable(lr) else args.weight_decay * lr
    return optax.adafactor(lr, min_dim_size_to_factor=1, decay_rate=0.8, multiply_by_parameter_scale=False,
                           clipping_threshold=1.0, eps=1e-30, weight_decay_rate=rate, weight_decay_mask=decay_mask)


_ADAMW_NAMES = ("adamw_hf", "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
                "adamw_apex_fused", "adamw_anyprecision", "paged_adamw_32bit")
_EIGHT_BIT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit", "rmsprop_bnb_8bit"}

#: HF ``optim`` name -> ``(args, learning_rate) -> optax.GradientTransformation`` (before clipping).
OPTIMIZERS: Dict[str, Callable[[Any, Any], optax.GradientTransformation]] = {
    **{name: _adamw for name in _ADAMW_NAMES + ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")},
    **{name: _lion for name in ("lion_32bit", "paged_lion_32bit", "lion_8bit", "paged_lion_8bit")},
    "adafactor": _adafactor,
    "sgd": lambda args, lr: _coupled_decay(args, optax.sgd(lr)),
    "adagrad": lambda args, lr: _coupled_decay(args, optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-10)),
    **{name: (lambda args, lr: _coupled_decay(args, optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)))
       for name in ("rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")},
}


def make_optimizer(args: TrainingArguments, num_training_steps: int, learning_rate: Any = None) -> optax.GradientTransformation:
    """``args.optim`` (AdamW by default) with HF's defaults and weight-decay set, global-norm
    clipping at ``max_grad_norm`` first, and the HF schedule (or ``learning_rate``: a float or
    an optax schedule)."""
    if args.optim in _EIGHT_BIT:
        warnings.warn(f"optim={args.optim!r}: rljax keeps the optimizer state in float32 (same update rule, no 8-bit "
                      "quantisation).", UserWarning)
    lr = make_schedule(args, num_training_steps) if learning_rate is None else learning_rate
    return optax.chain(*_clipping(args), OPTIMIZERS[args.optim](args, lr))


def _clipping(args: TrainingArguments) -> list:
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        return [optax.clip_by_global_norm(args.max_grad_norm)]
    return []


def find_hyperparam(opt_state: Any, name: str) -> Optional[float]:
    """The value of hyperparameter ``name`` in an ``optax.inject_hyperparams`` state inside
    ``opt_state`` (None when the optimizer was not built that way)."""
    found = []

    def visit(node):
        hp = getattr(node, "hyperparams", None)
        if isinstance(hp, dict) and name in hp:
            found.append(hp[name])
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(opt_state)
    return float(jax.device_get(found[0])) if found else None


# --------------------------------------------------------------------------------------------
# Pure steps
# --------------------------------------------------------------------------------------------


def module_in_dtype(module: Any, dtype: Any) -> Any:
    """``module`` computing in ``dtype`` (activations and matmuls; flax casts the params per
    layer, so they stay in their own dtype): a family's ``dtype`` field, or a value-head
    wrapper's LM's. Logits, values and scores still come out in float32."""
    if hasattr(module, "lm"):
        return module.clone(lm=module_in_dtype(module.lm, dtype))
    if hasattr(module, "with_dtype"):  # a wrapper (rljax.models.peft.LoraModel) rebuilds its base
        return module.with_dtype(dtype)
    if "dtype" not in {f.name for f in dataclasses.fields(module)}:
        raise ValueError(
            f"bf16=True needs a model whose compute dtype can be set; {type(module).__name__} has no `dtype` "
            "field. Pass bf16=False, or load the model with dtype=bfloat16."
        )
    return module.clone(dtype=dtype)


def make_train_step(loss_fn: LossFn, gradient_accumulation_steps: int = 1, donate: bool = True,
                    gradient_checkpointing: bool = False, trainable: Any = None) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted.

    ``batch`` leaves are ``[gradient_accumulation_steps * micro_batch, ...]``; gradients
    of the micro-batches are averaged (a ``lax.scan``) before one optimizer update, as HF
    Trainer averages per-micro-batch losses. ``metrics`` holds the micro-batch mean of
    every metric ``loss_fn`` returns, plus ``loss`` and ``grad_norm`` (before clipping).
    ``gradient_checkpointing``: wrap ``loss_fn`` in ``jax.checkpoint``, so the backward pass
    recomputes the forward instead of keeping its activations from the forward pass.
    ``trainable``: a bool pytree like the params (PEFT: ``rljax.models.peft.trainable_mask``);
    gradients are taken w.r.t. the True leaves only (a quantized or frozen base never gets a
    gradient buffer), the others get zero updates (pair it with a frozen-aware optimizer).
    """
    from rljax.sharding import constrain_batch

    accum = int(gradient_accumulation_steps)
    if gradient_checkpointing:
        loss_fn = jax.checkpoint(loss_fn)

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        state, rng = state.split_rng()
        micro = jax.tree_util.tree_map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        micro = constrain_batch(micro, batch_axis=1)  # on a mesh: each micro-batch's rows stay split
        keys = jax.random.split(rng, accum)
        if trainable is None:
            train_params, grad_fn = state.params, jax.value_and_grad(loss_fn, has_aux=True)
        else:
            from rljax.models.peft import merge_trainable, split_trainable

            train_params, frozen = split_trainable(state.params, trainable)
            grad_fn = jax.value_and_grad(lambda tp, mb, key: loss_fn(merge_trainable(tp, frozen), mb, key), has_aux=True)

        def body(acc, inputs):
            mb, key = inputs
            (loss, metrics), grads = grad_fn(train_params, mb, key)
            metrics = dict(metrics, loss=loss)
            acc = jax.tree_util.tree_map(jnp.add, acc, (grads, metrics))
            return acc, None

        zero_grads = jax.tree_util.tree_map(jnp.zeros_like, train_params)
        mb0 = jax.tree_util.tree_map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: dict(loss_fn(state.params, mb0, keys[0])[1], loss=jnp.zeros(())))
        zero_metrics = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(body, (zero_grads, zero_metrics), (micro, keys))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        metrics = jax.tree_util.tree_map(lambda m: m / accum, metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        if trainable is not None:  # zero "gradients" for the frozen leaves (their updates are zero)
            grads = merge_trainable(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        return state.apply_gradients(grads), metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable:
    """``eval_step(params, batch) -> metrics`` (loss included), jitted, deterministic."""

    def eval_step(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return dict(metrics, loss=loss)

    return jax.jit(eval_step)


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Create ``path``; refuse to write into a non-empty directory unless ``overwrite``."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"Output directory {path!r} exists and is not empty. Pass overwrite_output_dir=True to write into it, "
            "or choose a new output_dir."
        )
    os.makedirs(path, exist_ok=True)


# --------------------------------------------------------------------------------------------
# HF Trainer objects: state, control, callbacks, outputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainerState:
    """``transformers.TrainerState``: what ``trainer.state`` holds (``log_history``,
    ``global_step``, ``epoch``, ...). Written to ``trainer_state.json`` in each checkpoint."""

    epoch: Optional[float] = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: Optional[int] = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    best_metric: Optional[float] = None
    best_model_checkpoint: Optional[str] = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: Optional[str] = None
    trial_params: Optional[Dict[str, Any]] = None

    def save_to_json(self, json_path: str) -> None:
        with open(json_path, "w") as f:
            f.write(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_from_json(cls, json_path: str) -> "TrainerState":
        with open(json_path) as f:
            return cls(**json.load(f))


@dataclasses.dataclass
class TrainerControl:
    """``transformers.TrainerControl``: flags callbacks may set in their ``on_*`` events."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False


CALLBACK_EVENTS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_substep_end", "on_step_end", "on_evaluate", "on_predict", "on_save", "on_log", "on_prediction_step",
)


class EvalPrediction(NamedTuple):
    """``transformers.EvalPrediction``: what ``compute_metrics`` receives (also unpackable as
    ``predictions, label_ids = eval_pred``)."""

    predictions: np.ndarray
    label_ids: np.ndarray


class PredictionOutput(NamedTuple):
    """``transformers.trainer_utils.PredictionOutput``: ``predict()``'s result."""

    predictions: np.ndarray
    label_ids: Optional[np.ndarray]
    metrics: Dict[str, float]


class TrainOutput(dict):
    """``train()``'s result. HF's ``TrainOutput`` fields are attributes (``global_step``,
    ``training_loss``, ``metrics``: the summary logged last); the dict holds the summary plus
    the training metrics averaged over the last logging window (``loss``, ``grad_norm``, the
    trainer's own metrics) and ``step``."""

    def __init__(self, global_step: int, training_loss: float, metrics: Dict[str, float], window: Dict[str, float]):
        super().__init__({**window, **metrics, "step": global_step})
        self.global_step = global_step
        self.training_loss = training_loss
        self.metrics = metrics


def _check_callback(cb: Any) -> Any:
    if isinstance(cb, type):  # HF accepts a callback class and instantiates it
        cb = cb()
    if not any(callable(getattr(cb, e, None)) for e in CALLBACK_EVENTS):
        raise TypeError(
            f"callbacks: {cb!r} has none of the TrainerCallback events {list(CALLBACK_EVENTS)}; pass objects "
            "(e.g. transformers.TrainerCallback subclasses) that define some of them."
        )
    return cb


def _count_tokens(batch: Dict[str, Any]) -> int:
    return int(sum(np.size(v) for k, v in batch.items() if k.endswith("input_ids")))


def _rounded_epoch(epoch: Optional[float]) -> Optional[float]:
    return None if epoch is None else round(float(epoch), 2)


# --------------------------------------------------------------------------------------------
# The Trainer shell
# --------------------------------------------------------------------------------------------


class Trainer:
    """Shell shared by SFT / reward / DPO trainers: owns I/O and the loop, calls the pure step.

    Subclasses set ``self.loss_fn`` (params, batch, rng) -> (loss, metrics) and
    ``self.collate`` (list of examples -> dict of numpy arrays), implement ``_save``, and may
    set ``self.predict_fn`` (params, batch) -> (metrics incl. loss, predictions [b, ...],
    labels [b, ...]) for ``predict()`` and ``compute_metrics``.

    HF semantics: ``trainer.state`` is a :class:`TrainerState` (``log_history``, ``global_step``,
    ``epoch``, ...); the jitted optimisation state (params, optimizer state, step, PRNG key)
    is ``trainer.train_state``. ``model`` may be a flax module (with ``params``) or a model
    object with ``.module`` / ``.params`` (``model_object``): such an object gets the trained
    params assigned to its ``.params`` at the end of ``train()``, and is ``trainer.model``.
    ``callbacks``: objects with HF ``TrainerCallback`` events (``on_log``, ``on_step_end``,
    ``on_train_end``, ...; each called with ``(args, state, control, **kwargs)`` when defined;
    ``control.should_training_stop`` / ``should_save`` / ``should_evaluate`` / ``should_log`` set
    in ``on_step_end`` are honoured). ``optimizers=(tx, schedule)``: an optax
    ``GradientTransformation`` and/or schedule (see :meth:`create_state`).
    """

    _tag_names: List[str] = []
    predict_fn: Optional[Callable] = None

    def __init__(
        self,
        model: Any,
        params: Any,
        args: TrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        mesh=None,
        *,
        model_object: Any = None,
        callbacks: Optional[Sequence[Any]] = None,
        compute_metrics: Optional[Callable] = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
    ):
        if model_object is None and hasattr(model, "module") and hasattr(model, "params"):
            model_object, params, model = model, (model.params if params is None else params), model.module
        self.module = model
        self.model = model_object if model_object is not None else model
        self._model_object = model_object
        # PEFT (rljax.models.peft): only the adapters (+ modules_to_save) train and have
        # optimizer state; save_model writes PEFT's adapter files.
        self.peft_config, self._trainable = peft_setup(model, params, model_object)
        self.mesh = mesh  # a jax.sharding.Mesh (rljax.sharding.make_mesh): shard state and batches on it
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.state = TrainerState()
        self.control = TrainerControl()
        self._init_params = params
        self.train_state: Optional[TrainState] = None
        self._train_step = None
        self._eval_step = None
        self._predict_step = None
        self._metric_logger = None  # built on the first _log when args.report_to names sinks
        self._last_window: Dict[str, float] = {}
        self.callbacks = [_check_callback(cb) for cb in (callbacks or [])]
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        opt, sched = optimizers if optimizers is not None else (None, None)
        if opt is not None and not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise TypeError(
                f"optimizers[0] must be an optax.GradientTransformation (e.g. optax.adamw(1e-4)), got {type(opt).__name__}."
            )
        if sched is not None and not callable(sched):
            raise TypeError(f"optimizers[1] must be an optax schedule (a callable step -> lr), got {type(sched).__name__}.")
        self._user_optimizer, self._user_schedule = opt, sched
        self.optimizer, self.lr_scheduler = opt, sched
        self.schedule = sched
        self._lr_factor = None
        self.model_tags = list(getattr(model_object, "model_tags", None) or [])
        self.model_tags += [t for t in self._tag_names if t not in self.model_tags]
        if model_object is not None and self._tag_names:
            _add_model_tags(model_object, self._tag_names)
        self._callback("on_init_end")

    # -- hooks --------------------------------------------------------------------------------
    loss_fn: LossFn
    collate: Callable[[Sequence[dict]], Dict[str, np.ndarray]]

    def _save(self, output_dir: str) -> None:
        raise NotImplementedError

    # -- HF-style attributes ----------------------------------------------------------------
    @property
    def log_history(self) -> List[dict]:
        """``trainer.state.log_history``: every logged dict, in order."""
        return self.state.log_history

    @log_history.setter
    def log_history(self, value: List[dict]) -> None:
        self.state.log_history = value

    @property
    def params(self):
        """The current params (the trained ones once ``train()`` has run)."""
        return self._init_params if self.train_state is None else self.train_state.params

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(_check_callback(callback))

    def remove_callback(self, callback: Any) -> None:
        self.pop_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def _callback(self, event: str, **kwargs: Any) -> None:
        for cb in getattr(self, "callbacks", ()):
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            result = fn(
                self.args, self.state, self.control, model=self.model, tokenizer=getattr(self, "tokenizer", None),
                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                train_dataloader=getattr(self, "_batches", None), eval_dataloader=None, **kwargs,
            )
            if isinstance(result, TrainerControl):
                self.control = result

    def is_world_process_zero(self) -> bool:
        return jax.process_index() == 0

    def is_local_process_zero(self) -> bool:
        return jax.process_index() == 0

    # -- optimisation state --------------------------------------------------------------------
    def num_training_steps(self) -> int:
        n = len(self.train_dataset)
        per_epoch = max(n // self.args.train_batch_size, 1)
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(int(math.ceil(per_epoch * self.args.num_train_epochs)), 1)

    def create_state(self) -> TrainState:
        """The optimisation state for ``train()``, from the current params (a copy: the jitted
        step donates its input).

        The optimizer: without ``optimizers`` the one ``args.optim`` names, on the HF schedule
        (or on ``optimizers[1]``, an optax schedule). With ``optimizers[0]`` (an optax
        transformation), HF's rules: global-norm clipping at ``max_grad_norm`` goes first, and
        without a schedule the args' schedule multiplies the optimizer's updates (transformers'
        LambdaLR scales the optimizer's learning rate by the same factor); with a schedule, the
        transformation is used as it is (build it with that schedule) and the schedule gives
        the logged ``learning_rate``.
        """
        args = self.args
        steps = self.num_training_steps()
        opt, sched = self._user_optimizer, self._user_schedule
        self._lr_factor = None
        if opt is None:
            self.schedule = sched if sched is not None else make_schedule(args, steps)
            tx = make_optimizer(args, steps, learning_rate=self.schedule)
        elif sched is None:
            self.schedule = None
            self._lr_factor = make_schedule(args, steps, peak=1.0)
            tx = optax.chain(*_clipping(args), opt, optax.scale_by_schedule(self._lr_factor))
        else:
            self.schedule = sched
            tx = optax.chain(*_clipping(args), opt)
        if self._trainable is not None:  # PEFT: no updates and no optimizer state for the frozen base
            labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", self._trainable)
            tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
        self.optimizer, self.lr_scheduler = tx, self.schedule
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self.params)
        return TrainState.create(params, tx, jax.random.PRNGKey(args.seed))

    def _learning_rate(self, step: int) -> Optional[float]:
        """The learning rate HF logs after ``step`` updates (its scheduler has stepped ``step``
        times); None when a user optimizer hides it (not built with optax.inject_hyperparams)."""
        if self.schedule is not None:
            return float(self.schedule(step))
        lr = find_hyperparam(self.train_state.opt_state, "learning_rate") if self.train_state is not None else None
        if lr is None:
            return None
        return lr * (float(self._lr_factor(step)) if self._lr_factor is not None else 1.0)

    # -- logging ------------------------------------------------------------------------------
    def log(self, logs: Dict[str, float]) -> None:
        """HF's ``Trainer.log``: adds ``epoch`` to ``logs``, appends ``{**logs, "step": global_step}``
        to ``state.log_history`` and the report_to sinks, calls ``on_log``. metrics.jsonl in
        output_dir holds the entries logged while ``train()`` runs (training steps and
        evaluations; the run summary is in ``log_history[-1]``)."""
        self._log_entry(logs, jsonl=getattr(self, "_in_train", False))

    def _log_entry(self, logs: Dict[str, float], jsonl: bool) -> None:
        if self.state.epoch is not None:
            logs["epoch"] = _rounded_epoch(self.state.epoch)
        self._log({**logs, "step": self.state.global_step}, jsonl=jsonl)
        self._callback("on_log", logs=logs)

    def _log(self, metrics: Dict[str, float], pbar=None, jsonl: bool = True) -> None:
        self.log_history.append(metrics)
        if pbar is not None:
            pbar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k or k in ("loss", "eval_loss")})
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        if jsonl and os.path.isdir(self.args.output_dir):
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        logger = self._sinks()
        if logger is not None:
            logger.log(metrics, int(metrics.get("step", len(self.log_history))))

    def _sinks(self):
        """``rljax.logging.MetricLogger`` for the sinks ``args.report_to`` names besides the
        always-written metrics.jsonl (tensorboard, wandb, stdout); None when there are none."""
        if getattr(self, "_metric_logger", None) is None:
            from rljax.logging import MetricLogger, resolve_sink_names

            names = [n for n in resolve_sink_names(self.args.report_to) if n != "jsonl"]
            name = getattr(self.args, "run_name", None) or type(self).__name__
            self._metric_logger = (
                MetricLogger(names, self.args.output_dir, config=self.args.to_dict(), project_name=name)
                if names else False
            )
        return self._metric_logger or None

    def close_loggers(self) -> None:
        """Flush and close the report_to sinks (train() does this at its end)."""
        if getattr(self, "_metric_logger", None):
            self._metric_logger.close()
        self._metric_logger = None

    def log_metrics(self, split: str, metrics: Dict[str, Any]) -> None:
        """Print ``metrics`` as HF's ``Trainer.log_metrics`` does."""
        print(f"***** {split} metrics *****")
        width = max((len(k) for k in metrics), default=0)
        for k in sorted(metrics):
            print(f"  {k:<{width}} = {metrics[k]}")

    def save_metrics(self, split: str, metrics: Dict[str, Any], combined: bool = True) -> None:
        """Write ``{split}_results.json`` (and merge into ``all_results.json``) in output_dir."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, f"{split}_results.json"), "w") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged = json.load(open(path)) if os.path.exists(path) else {}
            merged.update(metrics)
            with open(path, "w") as f:
                json.dump(merged, f, indent=4, sort_keys=True)

    def save_state(self) -> None:
        """Write ``trainer_state.json`` to output_dir (HF ``Trainer.save_state``)."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))

    # -- loop ---------------------------------------------------------------------------------
    def _update_batch_size(self, n: int):
        """``(examples per update, micro-batches per update)``. A dataset smaller than one
        accumulated batch still trains (as HF): every update uses all ``n`` examples as one
        micro-batch, with a warning."""
        args = self.args
        if n >= args.train_batch_size:
            return args.train_batch_size, args.gradient_accumulation_steps
        warnings.warn(
            f"train_dataset has {n} examples, fewer than one batch (per_device_train_batch_size x "
            f"gradient_accumulation_steps = {args.train_batch_size}); every update uses all {n} examples as one batch.",
            UserWarning,
        )
        return n, 1

    def train(self, resume_from_checkpoint: Union[None, bool, str] = None, trial: Any = None,
              ignore_keys_for_eval: Optional[List[str]] = None, **kwargs: Any) -> TrainOutput:
        """Run the training loop (HF ``Trainer.train``); returns a :class:`TrainOutput`.

        ``trainer.state.log_history`` gets one entry per logging step and evaluation, then the
        run summary (``train_runtime``, ``train_samples_per_second``, ``train_steps_per_second``,
        ``total_flos`` (6 x tokens x params), ``train_loss`` (mean loss of this run's updates),
        ``epoch``, ``step``). Checkpoints (``checkpoint-<step>/``: HF model, trainer_state.json
        and the resumable train state) are written every ``save_steps`` (or at each epoch end
        with ``save_strategy="epoch"``) and at the final step, keeping ``save_total_limit``.

        ``resume_from_checkpoint`` (HF semantics): a ``checkpoint-<step>`` directory written by
        this loop, a directory holding such checkpoints (the newest is used), or True for the
        newest one in ``args.output_dir``. Params, optimizer state, step, PRNG key, data
        position and log history are restored, so the run continues exactly as if it had
        never stopped (same args required).
        """
        from tqdm.auto import tqdm

        if trial is not None:
            raise ValueError("train(trial=...) (hyperparameter search) is not supported by rljax trainers.")
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}.")
        args = self.args
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise ValueError("train() needs a non-empty train_dataset.")
        self._check_compute_metrics()
        per_update, accum = self._update_batch_size(len(self.train_dataset))
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume_from_checkpoint
        resume_dir = None
        if resume_from_checkpoint not in (None, False):
            resume_dir = find_resume_checkpoint(args.output_dir if resume_from_checkpoint is True else resume_from_checkpoint)
            os.makedirs(args.output_dir, exist_ok=True)
        else:
            prepare_output_dir(args.output_dir, args.overwrite_output_dir)
        self.train_state = self.create_state()
        self._train_step = self._build_train_step(accum, per_update // accum)
        total = self.num_training_steps()
        batches = BatchIterator(
            self.train_dataset, per_update, seed=args.seed, shuffle=True, drop_last=True, collate_fn=self.collate,
        )
        self._batches = batches
        self.state = TrainerState(
            max_steps=total, logging_steps=args.logging_steps, eval_steps=args.eval_steps or args.logging_steps,
            save_steps=args.save_steps, train_batch_size=per_update, num_train_epochs=math.ceil(total / len(batches)),
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero(),
        )
        self.control = TrainerControl()
        start = 0
        if resume_dir is not None:
            self.train_state, extra = restore_train_state(resume_dir, self.train_state)
            start, batches.position = int(extra["step"]), int(extra["data_position"])
            from rljax.logging import drop_jsonl_records_after

            drop_jsonl_records_after(os.path.join(args.output_dir, "metrics.jsonl"), start)
            saved = os.path.join(resume_dir, "trainer_state.json")
            if os.path.exists(saved):
                old = TrainerState.load_from_json(saved)
                self.state.total_flos, self.state.best_metric = old.total_flos, old.best_metric
                self.state.best_model_checkpoint = old.best_model_checkpoint
            self.state.log_history = list(extra.get("log_history", []))
            self.state.global_step, self.state.epoch = start, start / len(batches)
        n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.train_state.params))
        self._callback("on_train_begin")
        self._in_train = True
        window: List[Dict[str, jax.Array]] = []
        self._last_window = {}
        total_loss, steps_run, t0 = 0.0, 0, time.time()
        pbar = tqdm(total=total, initial=start, desc=type(self).__name__, disable=args.disable_tqdm)
        for step in range(start + 1, total + 1):
            epoch_before = batches.epoch
            if batches.position % len(batches) == 0:
                self._callback("on_epoch_begin")
            self._callback("on_step_begin")
            batch = next(batches)
            self.state.total_flos += 6.0 * n_params * _count_tokens(batch)
            self.train_state, metrics = self._train_step(self.train_state, self._place_batch(batch))
            window.append(metrics)
            total_loss, steps_run = total_loss + metrics["loss"], steps_run + 1
            pbar.update(1)
            self.state.global_step, self.state.epoch = step, step / len(batches)
            self._step_end_flow(step, total)
            self._callback("on_step_end")
            if batches.epoch > epoch_before:
                self._epoch_end_flow()
                self._callback("on_epoch_end")
            window = self._maybe_log_save_evaluate(window, batches, pbar)
            if self.control.should_training_stop:
                break
        pbar.close()
        self._in_train = False
        runtime = max(time.time() - t0, 1e-9)
        train_loss = float(jax.device_get(total_loss)) / max(steps_run, 1)
        summary = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(steps_run * per_update / runtime, 3),
            "train_steps_per_second": round(steps_run / runtime, 3),
            "total_flos": float(self.state.total_flos),
            "train_loss": train_loss,
        }
        last = self._window_means(window) if window else self._last_window
        self._log_entry(summary, jsonl=False)  # adds epoch, like HF's log
        if self._model_object is not None:
            self._write_back_params()
        self._callback("on_train_end")
        self.close_loggers()
        return TrainOutput(self.state.global_step, train_loss, summary, last)

    def _write_back_params(self) -> None:
        """Give the user's model object the trained params (HF/TRL train the model in place)."""
        try:
            self._model_object.params = self.params
        except AttributeError as err:
            raise AttributeError(
                f"Cannot assign the trained params to {type(self._model_object).__name__}.params ({err}); read "
                "trainer.params instead, or pass a model object whose params attribute is assignable."
            ) from None

    def _step_end_flow(self, step: int, total: int) -> None:
        """transformers' DefaultFlowCallback.on_step_end: what to do after update ``step``."""
        args, c = self.args, self.control
        if args.logging_strategy == "steps" and (step % args.logging_steps == 0 or (args.logging_first_step and step == 1)):
            c.should_log = True
        if args.evaluation_strategy == "steps" and step % (args.eval_steps or args.logging_steps) == 0:
            c.should_evaluate = True
        if args.save_strategy == "steps" and args.save_steps > 0 and step % args.save_steps == 0:
            c.should_save = True
        if step >= total:
            c.should_training_stop = True
            if args.save_strategy != "no":
                c.should_save = True

    def _epoch_end_flow(self) -> None:
        args, c = self.args, self.control
        c.should_log |= args.logging_strategy == "epoch"
        c.should_evaluate |= args.evaluation_strategy == "epoch"
        c.should_save |= args.save_strategy == "epoch"

    @staticmethod
    def _window_means(window: List[Dict[str, jax.Array]]) -> Dict[str, float]:
        host = jax.device_get(window)
        return {k: float(np.mean([m[k] for m in host])) for k in host[0]}

    def _maybe_log_save_evaluate(self, window, batches, pbar):
        c = self.control
        if c.should_log and window:
            logged = self._window_means(window)
            if not np.isfinite(logged.get("loss", 0.0)):
                raise FloatingPointError(
                    f"The training loss is {logged['loss']} at step {self.state.global_step}; stopping instead of "
                    "training on NaN. With float16 params use bfloat16 or float32 (load with torch_dtype=...; "
                    "bf16=True keeps float32 master params), or lower the learning rate."
                )
            lr = self._learning_rate(self.state.global_step)
            if lr is not None:
                logged["learning_rate"] = lr
            self._last_window = dict(logged)
            self.log(logged)
            pbar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if "/" not in k})
            window = []
        c.should_log = False
        if c.should_evaluate and self.eval_dataset is not None:
            self.evaluate()
        c.should_evaluate = False
        if c.should_save:
            self._save_checkpoint(batches)
        c.should_save = False
        return window

    def _save_checkpoint(self, batches) -> None:
        step = self.state.global_step
        checkpoint_dir = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        self.save_model(checkpoint_dir)
        self.state.save_to_json(os.path.join(checkpoint_dir, "trainer_state.json"))
        save_train_state(checkpoint_dir, self.train_state, step, batches.position, self.log_history)
        self._callback("on_save")
        rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)

    @property
    def compute_module(self) -> Any:
        """The module the loss and prediction functions run: ``self.module`` computing in
        bfloat16 with ``bf16=True`` (float32 params, gradients, optimizer state and loss), each
        block rematerialised with ``gradient_checkpointing=True`` (same numbers, less memory)."""
        from rljax.models.attention import supports_layer_options, with_layer_options

        module = module_in_dtype(self.module, jnp.bfloat16) if self.args.bf16 else self.module
        if self.args.gradient_checkpointing and supports_layer_options(module):
            policy = (self.args.gradient_checkpointing_kwargs or {}).get("policy", "full")
            module = with_layer_options(module, remat_policy=policy)
        return module

    def _remat_whole_loss(self) -> bool:
        """gradient_checkpointing for a model without per-block remat: jax.checkpoint the loss."""
        from rljax.models.attention import supports_layer_options

        return bool(self.args.gradient_checkpointing) and not supports_layer_options(self.module)

    def _build_train_step(self, accum: Optional[int] = None, micro_batch: Optional[int] = None) -> Callable:
        """The jitted train step; with ``self.mesh`` the state is sharded by the model family's
        partition rules, batches on (data, fsdp), and the step is jitted with those shardings."""
        accum = self.args.gradient_accumulation_steps if accum is None else accum
        micro_batch = self.args.per_device_train_batch_size if micro_batch is None else micro_batch
        step = make_train_step(self.loss_fn, accum, gradient_checkpointing=self._remat_whole_loss(),
                               trainable=self._trainable)
        if self.mesh is None:
            return step
        from rljax.sharding import batch_sharding, jit_sharded, replicated

        self.train_state, shardings = shard_state_for_mesh(
            self.train_state, self.mesh, micro_batch,
            f"The micro-batch of {micro_batch} examples (per_device_train_batch_size, or the whole dataset when it "
            "is smaller than one batch)",
        )
        return jit_sharded(
            step, self.mesh, in_shardings=(shardings, batch_sharding(self.mesh)),
            out_shardings=(shardings, replicated(self.mesh)), donate_argnums=(0,),
        )

    def _place_batch(self, batch: Dict[str, np.ndarray]):
        check_token_ids_fit(batch, self.module)
        if self.mesh is None:
            return batch
        from rljax.sharding import shard_batch

        return shard_batch(batch, self.mesh)

    # -- evaluation ---------------------------------------------------------------------------
    def _check_compute_metrics(self) -> None:
        if self.compute_metrics is not None and self.predict_fn is None:
            raise ValueError(
                f"compute_metrics needs predictions, which {type(self).__name__} does not produce; pass "
                "compute_metrics=None (its loss-function metrics are logged with an eval_ prefix)."
            )

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval", *,
                 ignore_keys: Optional[List[str]] = None) -> Dict[str, float]:
        """HF ``Trainer.evaluate``: the mean of the loss function's metrics over ``eval_dataset``
        (keys prefixed ``eval_``), ``compute_metrics``' results when set, and
        ``eval_runtime`` / ``eval_samples_per_second`` / ``eval_steps_per_second``; logged once
        (with ``epoch`` once training has started). A dict of datasets is evaluated one by one
        with prefixes ``eval_<name>``."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(ds, dict):
            out: Dict[str, float] = {}
            for name, sub in ds.items():
                out.update(Trainer.evaluate(self, sub, f"{metric_key_prefix}_{name}"))
            return out
        if ds is None or len(ds) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        self._check_compute_metrics()
        out, _, _ = self._evaluation_loop(ds, metric_key_prefix, predictions=self.compute_metrics is not None)
        self.log(out)
        self._callback("on_evaluate", metrics=out)
        return out

    def predict(self, test_dataset, ignore_keys: Optional[List[str]] = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """HF ``Trainer.predict``: ``PredictionOutput(predictions, label_ids, metrics)`` over
        ``test_dataset`` (metrics prefixed ``test_``; not logged)."""
        if self.predict_fn is None:
            raise ValueError(f"{type(self).__name__} does not produce predictions; use evaluate() for its metrics.")
        if test_dataset is None or len(test_dataset) == 0:
            raise ValueError("predict() needs a non-empty test_dataset.")
        metrics, preds, labels = self._evaluation_loop(test_dataset, metric_key_prefix, predictions=True)
        self._callback("on_predict", metrics=metrics)
        return PredictionOutput(preds, labels, metrics)

    def _evaluation_loop(self, ds, prefix: str, predictions: bool):
        """Batches of ``per_device_eval_batch_size`` in order; returns ``(metrics, predictions,
        labels)`` (the last two None unless ``predictions``)."""
        if predictions and self._predict_step is None:
            self._predict_step = jax.jit(self.predict_fn)
        if not predictions and self._eval_step is None:
            self._eval_step = make_eval_step(self.loss_fn)
        t0 = time.time()
        batches = BatchIterator(ds, min(self.args.per_device_eval_batch_size, len(ds)), shuffle=False, num_epochs=1)
        sums: Dict[str, float] = {}
        preds, labels = [], []
        for examples in batches:
            batch = self.collate(examples)
            if predictions:
                m, p, lab = jax.device_get(self._predict_step(self.params, batch))
                if self.preprocess_logits_for_metrics is not None:
                    p = np.asarray(self.preprocess_logits_for_metrics(p, lab))
                preds.append(np.asarray(p))
                labels.append(np.asarray(lab))
            else:
                m = jax.device_get(self._eval_step(self.params, batch))
            for k, v in m.items():  # batch means, weighted by the batch's size
                sums[k] = sums.get(k, 0.0) + float(v) * len(examples)
        out = {f"{prefix}_{k}": v / len(ds) for k, v in sums.items()}
        all_preds = np.concatenate(preds) if predictions else None
        all_labels = np.concatenate(labels) if predictions else None
        if predictions and self.compute_metrics is not None:
            for k, v in self.compute_metrics(EvalPrediction(all_preds, all_labels)).items():
                out[k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"] = v
        runtime = max(time.time() - t0, 1e-9)
        out[f"{prefix}_runtime"] = round(runtime, 4)
        out[f"{prefix}_samples_per_second"] = round(len(ds) / runtime, 3)
        out[f"{prefix}_steps_per_second"] = round(len(batches) / runtime, 3)
        return out, all_preds, all_labels

    # -- saving -------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write the model in HF format (config.json + safetensors) to ``output_dir``, with a
        model card README.md carrying ``model_tags`` (e.g. TRL's ``trl``, ``dpo``) when any."""
        output_dir = output_dir or self.args.output_dir
        if self.peft_config is not None:  # TRL saves a PeftModel's adapter (PEFT's files), not the base
            from rljax.models.hub import family_of
            from rljax.models.peft import save_adapter

            save_adapter(output_dir, self.params, self.peft_config, family_of(self.module.config))
        else:
            self._save(output_dir)
        if self.model_tags:
            write_model_card(output_dir, self.model_tags, type(self).__name__)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: rljax runs offline."""
        raise ValueError(
            "push_to_hub: rljax runs offline and never uploads. Save with trainer.save_model(output_dir) and upload "
            "the directory yourself (e.g. `huggingface-cli upload`)."
        )


def _add_model_tags(model_object: Any, tags: Sequence[str]) -> None:
    """HF ``PreTrainedModel.add_model_tags`` on a model object (skipped when it cannot hold them)."""
    if hasattr(model_object, "add_model_tags"):
        model_object.add_model_tags(list(tags))
        return
    current = list(getattr(model_object, "model_tags", None) or [])
    try:
        model_object.model_tags = current + [t for t in tags if t not in current]
    except (AttributeError, TypeError):
        pass


def write_model_card(output_dir: str, tags: Sequence[str], trainer_name: str) -> None:
    """A minimal HF model card: README.md whose YAML header lists ``tags`` (what the Hub reads)."""
    os.makedirs(output_dir, exist_ok=True)
    header = "\n".join(["---", "tags:", *[f"- {t}" for t in tags], "---", ""])
    body = f"\n# {os.path.basename(os.path.abspath(output_dir))}\n\nTrained with rljax's {trainer_name}.\n"
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(header + body)


def check_token_ids_fit(batch: Dict[str, Any], module: Any) -> None:
    """Host check of a collated batch: every ``*input_ids`` id must index the model's embedding
    (an id >= vocab_size gathers NaN in JAX, e.g. a tokenizer larger than the model)."""
    from rljax.generation import check_token_range

    for key, ids in batch.items():
        if key.endswith("input_ids") and isinstance(ids, np.ndarray):
            check_token_range(
                module, ids, f"batch[{key!r}]",
                "the tokenizer and the model do not match (len(tokenizer) must be <= config.vocab_size). Use the "
                "model's own tokenizer, or build the model with vocab_size=len(tokenizer).",
            )


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> None:
    """Delete the oldest ``checkpoint-<step>`` directories beyond ``save_total_limit`` (HF's
    ``_rotate_checkpoints``; called only after the newest checkpoint is completely written)."""
    if save_total_limit is None or save_total_limit <= 0 or not os.path.isdir(output_dir):
        return
    from rljax.checkpoint import checkpoint_problem

    found = []
    for name in os.listdir(output_dir):
        head, _, tail = name.partition("-")
        if head == "checkpoint" and tail.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(tail), name))
    # Only committed checkpoints count towards the limit, so a half-written newer directory
    # (a killed save) never makes the last good checkpoint eligible for deletion.
    committed = [(s, n) for s, n in sorted(found)
                 if checkpoint_problem(os.path.join(output_dir, n, TRAIN_STATE_DIR), checksums=False) is None]
    for _, name in committed[:-save_total_limit]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _jax_dtype(value: Any) -> Any:
    """torch dtypes / names ("float32", "bfloat16", "float16", "auto") -> a JAX dtype (None for "auto")."""
    name = str(value).replace("torch.", "")
    if name == "auto":
        return None
    if name in ("float32", "bfloat16", "float16"):
        return getattr(jnp, name)
    raise ValueError(f"torch_dtype {value!r} is not supported; use float32, bfloat16, float16 or 'auto'.")


def shard_state_for_mesh(state: Any, mesh: Any, batch_rows: int, what: str) -> Tuple[Any, Any]:
    """Check that ``batch_rows`` (one step's rows, ``what`` names them in the error) split over
    the mesh's data x fsdp devices, then shard ``state`` by the model family's partition rules.
    Returns ``(sharded state, its shardings)``."""
    from rljax.sharding import batch_size_divisor, shard_state, state_shardings

    divisor = batch_size_divisor(mesh)
    if batch_rows % divisor:
        raise ValueError(f"{what} must be a multiple of the mesh's data x fsdp size ({divisor}) to shard batches.")
    state = shard_state(state, mesh)
    return state, state_shardings(state, mesh)


def resolve_tokenizer(model: Any, tokenizer: Any, missing: str) -> Any:
    """``tokenizer``, or the checkpoint's own when ``model`` is a path (``AutoTokenizer``);
    ``missing``: the ValueError message when there is neither."""
    if tokenizer is not None:
        return tokenizer
    if not isinstance(model, str):
        raise ValueError(missing)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def resolve_model(model: Any, params: Any = None, dtype=None, model_init_kwargs: Optional[Dict[str, Any]] = None):
    """Accept what TRL users pass as ``model`` and return ``(module, params)``.

    ``model`` may be a checkpoint path / hub id (loaded with ``rljax.models.from_pretrained``,
    with ``model_init_kwargs`` such as ``torch_dtype``), a ``(module, params)`` tuple, a flax
    module with ``params=`` given, or an object with ``.module`` and ``.params`` attributes.
    """
    if model_init_kwargs and not isinstance(model, str):
        raise ValueError(
            "model_init_kwargs are used only to load a model from a path; the model is already instantiated, "
            "so pass model_init_kwargs=None."
        )
    if isinstance(model, str):
        import inspect

        from rljax.models import from_pretrained

        kwargs = dict(model_init_kwargs or {})
        accepted = inspect.signature(from_pretrained).parameters
        if "torch_dtype" in kwargs and "torch_dtype" not in accepted:
            dtype = _jax_dtype(kwargs.pop("torch_dtype"))
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            raise ValueError(
                f"model_init_kwargs {unknown} are not supported by rljax.models.from_pretrained "
                f"(it takes {sorted(k for k in accepted if k != 'path_or_id')})."
            )
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        module, loaded = from_pretrained(model, **kwargs)
        return module, (params if params is not None else loaded)
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if hasattr(model, "module") and hasattr(model, "params"):
        return model.module, (params if params is not None else model.params)
    if params is None:
        raise ValueError(
            "Got a model module without params: pass params=..., a (module, params) tuple, or a checkpoint path."
        )
    return model, params


def model_object_of(model: Any) -> Any:
    """The user's model object that should receive the trained params (one with ``.module`` and
    an assignable ``.params``), or None for paths, tuples and bare modules."""
    return model if (hasattr(model, "module") and hasattr(model, "params") and not isinstance(model, tuple)) else None


def apply_peft(module: Any, params: Any, peft_config: Any, owner: str) -> Tuple[Any, Any, Any]:
    """TRL's ``peft_config=``: ``(module, params, peft_model)`` with fresh LoRA adapters
    (``rljax.models.peft.get_peft_model``), or the inputs unchanged (and None) without one."""
    if peft_config is None:
        return module, params, None
    from rljax.models.peft import get_peft_model, is_peft_module

    if is_peft_module(module):
        raise ValueError(f"{owner}: the model already has LoRA adapters and peft_config was given too; pass one of them.")
    peft_model = get_peft_model((module, params), peft_config)
    return peft_model.module, peft_model.params, peft_model


def peft_setup(module: Any, params: Any, model_object: Any = None) -> Tuple[Any, Any]:
    """``(LoraConfig, trainable mask)`` of a PEFT model (``rljax.models.peft``), else ``(None, None)``."""
    from rljax.models.peft import LoraConfig, is_peft_module, trainable_mask

    if params is None or not is_peft_module(module):
        return None, None
    config = getattr(model_object, "lora_config", None) or LoraConfig()
    mask = trainable_mask(params, config)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError("The PEFT model has no trainable parameters: its adapters are frozen "
                         "(LoraConfig(inference_mode=True), or PeftModel.from_pretrained without "
                         "is_trainable=True) and no modules_to_save; training would change nothing. "
                         "Load the adapter with is_trainable=True or pass a trainable peft_config.")
    return config, mask


def apply_overrides(config: Any, overrides: Dict[str, Any], owner: str) -> Any:
    """Return ``config`` with TRL-style trainer kwargs applied; unknown names raise a ValueError."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(k for k in overrides if k not in names)
    if unknown:
        raise ValueError(f"{owner} got unknown option(s) {unknown}; valid options are the fields of {type(config).__name__}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


# --------------------------------------------------------------------------------------------
# Resumable checkpoints: checkpoint-<step>/ holds the HF model and train_state/ (orbax)
# --------------------------------------------------------------------------------------------

TRAIN_STATE_DIR = "train_state"


def save_train_state(checkpoint_dir: str, state: TrainState, step: int, data_position: int, log_history=()) -> None:
    """Write the full ``TrainState`` (params, optimizer, step, PRNG key) and the data position
    to ``checkpoint_dir/train_state`` (``rljax.checkpoint.Checkpointer``, synchronous: the
    next train step donates the state). The save is atomic: only a finished write gets the
    commit marker that ``find_resume_checkpoint`` looks for; a failed one (e.g. a full disk)
    raises an ``OSError`` saying so and leaves earlier checkpoints untouched."""
    from rljax.checkpoint import Checkpointer

    extra = {"step": int(step), "data_position": int(data_position), "log_history": [dict(h) for h in log_history]}
    with Checkpointer(os.path.join(checkpoint_dir, TRAIN_STATE_DIR), async_save=False, overwrite=True) as ck:
        ck.save(int(step), state, extra, force=True)


def find_resume_checkpoint(path: str) -> str:
    """The ``checkpoint-<step>`` directory to resume from.

    ``path`` is a ``checkpoint-<step>`` directory (used as given; one whose train state is
    half-written or corrupt raises a ValueError naming the newest usable sibling) or a
    directory holding them (an ``output_dir``): then the newest one whose train state is
    committed and intact (commit marker, sizes, CRC32s) is used, and newer half-written or
    corrupt ones (a run killed mid-save, a truncated file) are skipped with a
    ``CheckpointWarning`` naming each. FileNotFoundError when none is usable.
    """
    from rljax.checkpoint import CheckpointWarning, checkpoint_problem

    def problem_of(checkpoint_dir: str) -> Optional[str]:
        return checkpoint_problem(os.path.join(checkpoint_dir, TRAIN_STATE_DIR), what=f"{TRAIN_STATE_DIR}/")

    def step_dirs(root: str) -> List[str]:  # checkpoint-<step> directories, newest first
        found = [(int(n.partition("-")[2]), n) for n in os.listdir(root)
                 if n.partition("-")[0] == "checkpoint" and n.partition("-")[2].isdigit()
                 and os.path.isdir(os.path.join(root, n))]
        return [os.path.join(root, n) for _, n in sorted(found, reverse=True)]

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from_checkpoint: {path!r} is not a directory.")
    name = os.path.basename(os.path.normpath(path))
    looks_like_one = name.partition("-")[0] == "checkpoint" and name.partition("-")[2].isdigit() and not step_dirs(path)
    if os.path.isdir(os.path.join(path, TRAIN_STATE_DIR)) or looks_like_one:
        problem = problem_of(path)
        if problem is None:
            return path
        parent = os.path.dirname(os.path.normpath(path)) or "."
        usable = [d for d in step_dirs(parent) if problem_of(d) is None]
        alternative = (
            f"the newest usable checkpoint there is {usable[0]}; pass it, or pass {parent!r} to "
            "resume from the newest usable checkpoint automatically" if usable else
            "no other checkpoint there is usable; start a fresh run"
        )
        raise ValueError(f"resume_from_checkpoint: {path} cannot be resumed from: {problem}. {alternative}.")
    skipped = []
    for candidate in step_dirs(path):
        problem = problem_of(candidate)
        if problem is None:
            for bad, why in skipped:
                warnings.warn(f"resume_from_checkpoint: skipping {bad} ({why}); resuming from {candidate}.",
                              CheckpointWarning, stacklevel=3)
            return candidate
        skipped.append((candidate, problem))
    if skipped:
        listing = "; ".join(f"{bad}: {why}" for bad, why in skipped)
        raise FileNotFoundError(
            f"resume_from_checkpoint: no committed checkpoint in {path!r}; every checkpoint-<step> there is "
            f"half-written or corrupt ({listing}). Start a fresh run (without resume_from_checkpoint)."
        )
    raise FileNotFoundError(
        f"resume_from_checkpoint: no checkpoint-<step>/{TRAIN_STATE_DIR} in {path!r}; checkpoints are written every "
        "save_steps updates (save_strategy='steps') by Trainer.train."
    )


def restore_train_state(checkpoint_dir: str, template: TrainState):
    """``(state, extra)`` from ``checkpoint_dir/train_state`` into the structure of ``template``
    (verified against its commit marker first; see ``find_resume_checkpoint``). Leaves are
    uncommitted where the template's are: a restored array comes back committed to its device,
    and a committed argument lowers with a sharding annotation, so a jitted step would compile
    a second program for the resumed state."""
    from rljax.checkpoint import Checkpointer

    with Checkpointer(os.path.join(checkpoint_dir, TRAIN_STATE_DIR), resume=True, async_save=False) as ck:
        restored, extra = ck.restore(target_state=template)
    return jax.tree_util.tree_map(_uncommitted_like, template, restored), extra


def _uncommitted_like(template: Any, restored: Any) -> Any:
    if isinstance(template, jax.Array) and not template.committed and isinstance(restored, jax.Array):
        return jnp.asarray(np.asarray(restored))
    return restored
