"""What every supervised-style trainer shares: TrainingArguments (HF field names and
defaults), the optimizer/schedule, a jitted train-step builder with gradient
accumulation, and the ``Trainer`` shell loop (batching, logging, eval, saving).

SFT, reward modelling and DPO only supply a loss function and a collator.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

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
    """Learning-rate schedule: linear, cosine, constant or constant_with_warmup."""
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
    """Accepted for HF compatibility; old checkpoints are not deleted."""
    seed: int = 42
    """Seed for parameter init, dropout and data order."""
    remove_unused_columns: bool = True
    """Accepted for HF compatibility."""
    report_to: Optional[List[str]] = None
    """Extra metric sinks besides metrics.jsonl: tensorboard, wandb, stdout, all or none."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    bf16: bool = False
    """Accepted for HF compatibility, not applied (load the model with dtype=bfloat16 instead)."""
    dataloader_drop_last: bool = False
    """Accepted for HF compatibility (training batches always drop the last partial one)."""
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
        if self.evaluation_strategy not in ("no", "steps", "epoch"):
            raise ValueError(f"evaluation_strategy must be 'no', 'steps' or 'epoch', got {self.evaluation_strategy!r}.")
        if self.save_strategy not in ("no", "steps", "epoch"):
            raise ValueError(f"save_strategy must be 'no', 'steps' or 'epoch', got {self.save_strategy!r}.")

    @property
    def train_batch_size(self) -> int:
        """Examples per optimizer update (per_device_train_batch_size x gradient_accumulation_steps)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(num_training_steps * self.warmup_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "constant": lambda lr, warmup, total: optax.constant_schedule(lr),
    "constant_with_warmup": _constant_with_warmup,
}


def make_schedule(args: TrainingArguments, num_training_steps: int) -> optax.Schedule:
    """HF's schedules: lr at update ``k`` (0-based) as transformers' LambdaLR gives it."""
    return SCHEDULES[args.lr_scheduler_type](args.learning_rate, args.get_warmup_steps(num_training_steps), num_training_steps)


def decay_mask(params: Any) -> Any:
    """HF AdamW's weight-decay set: every matrix (kernels, embeddings), no biases or norm scales."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(args: TrainingArguments, num_training_steps: int) -> optax.GradientTransformation:
    """AdamW with HF defaults, global-norm clipping at ``max_grad_norm`` and the HF schedule."""
    parts = []
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(args.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(args, num_training_steps),
            b1=args.adam_beta1,
            b2=args.adam_beta2,
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def make_train_step(loss_fn: LossFn, gradient_accumulation_steps: int = 1, donate: bool = True) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted.

    ``batch`` leaves are ``[gradient_accumulation_steps * micro_batch, ...]``; gradients
    of the micro-batches are averaged (a ``lax.scan``) before one optimizer update, as HF
    Trainer averages per-micro-batch losses. ``metrics`` holds the micro-batch mean of
    every metric ``loss_fn`` returns, plus ``loss`` and ``grad_norm`` (before clipping).
    """
    accum = int(gradient_accumulation_steps)

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        state, rng = state.split_rng()
        micro = jax.tree_util.tree_map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        keys = jax.random.split(rng, accum)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(acc, inputs):
            mb, key = inputs
            (loss, metrics), grads = grad_fn(state.params, mb, key)
            metrics = dict(metrics, loss=loss)
            acc = jax.tree_util.tree_map(jnp.add, acc, (grads, metrics))
            return acc, None

        zero_grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        mb0 = jax.tree_util.tree_map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: dict(loss_fn(state.params, mb0, keys[0])[1], loss=jnp.zeros(())))
        zero_metrics = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(body, (zero_grads, zero_metrics), (micro, keys))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        metrics = jax.tree_util.tree_map(lambda m: m / accum, metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
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


class Trainer:
    """Shell shared by SFT / reward / DPO trainers: owns I/O and the loop, calls the pure step.

    Subclasses set ``self.loss_fn`` (params, batch, rng) -> (loss, metrics) and
    ``self.collate`` (list of examples -> dict of numpy arrays), and implement ``_save``.
    """

    def __init__(self, model: Any, params: Any, args: TrainingArguments, train_dataset=None, eval_dataset=None, mesh=None):
        self.model = model
        self.mesh = mesh  # a jax.sharding.Mesh (rljax.sharding.make_mesh): shard state and batches on it
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.log_history: List[dict] = []
        self._init_params = params
        self.state: Optional[TrainState] = None
        self._train_step = None
        self._eval_step = None
        self._metric_logger = None  # built on the first _log when args.report_to names sinks

    # -- hooks --------------------------------------------------------------------------------
    loss_fn: LossFn
    collate: Callable[[Sequence[dict]], Dict[str, np.ndarray]]

    def _save(self, output_dir: str) -> None:
        raise NotImplementedError

    # -- loop ---------------------------------------------------------------------------------
    def num_training_steps(self) -> int:
        n = len(self.train_dataset)
        per_epoch = max(n // self.args.train_batch_size, 1)
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(int(math.ceil(per_epoch * self.args.num_train_epochs)), 1)

    def create_state(self) -> TrainState:
        steps = self.num_training_steps()
        self.schedule = make_schedule(self.args, steps)
        tx = make_optimizer(self.args, steps)
        # The jitted step donates its input state: train on a copy so the caller's params
        # (and a frozen reference that shares them, e.g. DPO's) stay alive.
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self._init_params)
        return TrainState.create(params, tx, jax.random.PRNGKey(self.args.seed))

    @property
    def params(self):
        return self._init_params if self.state is None else self.state.params

    def _log(self, metrics: Dict[str, float], pbar=None) -> None:
        self.log_history.append(metrics)
        if pbar is not None:
            pbar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k or k in ("loss", "eval_loss")})
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        if os.path.isdir(self.args.output_dir):
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
            self._metric_logger = (
                MetricLogger(names, self.args.output_dir, config=self.args.to_dict(), project_name=type(self).__name__)
                if names else False
            )
        return self._metric_logger or None

    def close_loggers(self) -> None:
        """Flush and close the report_to sinks (train() does this at its end)."""
        if getattr(self, "_metric_logger", None):
            self._metric_logger.close()
        self._metric_logger = None

    def train(self, resume_from_checkpoint: Union[None, bool, str] = None) -> Dict[str, float]:
        """Run the training loop; returns the final logged metrics (TrainOutput-like dict).

        ``resume_from_checkpoint`` (HF semantics): a ``checkpoint-<step>`` directory written by
        this loop, a directory holding such checkpoints (the newest is used), or True for the
        newest one in ``args.output_dir``. Params, optimizer state, step, PRNG key, data
        position and log history are restored, so the run continues exactly as if it had
        never stopped (same args required).
        """
        from tqdm.auto import tqdm

        args = self.args
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise ValueError("train() needs a non-empty train_dataset.")
        if len(self.train_dataset) < args.train_batch_size:
            raise ValueError(
                f"train_dataset has {len(self.train_dataset)} examples, fewer than one batch "
                f"(per_device_train_batch_size x gradient_accumulation_steps = {args.train_batch_size}); lower the batch size."
            )
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume_from_checkpoint
        resume_dir = None
        if resume_from_checkpoint not in (None, False):
            resume_dir = find_resume_checkpoint(args.output_dir if resume_from_checkpoint is True else resume_from_checkpoint)
            os.makedirs(args.output_dir, exist_ok=True)
        else:
            prepare_output_dir(args.output_dir, args.overwrite_output_dir)
        self.state = self.create_state()
        self._train_step = self._build_train_step()
        total = self.num_training_steps()
        batches = BatchIterator(
            self.train_dataset, args.train_batch_size, seed=args.seed, shuffle=True, drop_last=True,
            collate_fn=self.collate,
        )
        start = 0
        if resume_dir is not None:
            self.state, extra = restore_train_state(resume_dir, self.state)
            start, batches.position = int(extra["step"]), int(extra["data_position"])
            self.log_history = list(extra.get("log_history", []))
        running, t0 = [], time.time()
        pbar = tqdm(total=total, initial=start, desc=type(self).__name__, disable=args.disable_tqdm)
        for step in range(start + 1, total + 1):
            epoch = batches.epoch
            self.state, metrics = self._train_step(self.state, self._place_batch(next(batches)))
            running.append(metrics)
            pbar.update(1)
            if step % args.logging_steps == 0 or (args.logging_first_step and step == 1) or step == total:
                logged = {k: float(np.mean([jax.device_get(m[k]) for m in running])) for k in running[0]}
                logged.update(learning_rate=float(self.schedule(step - 1)), epoch=step / len(batches), step=step)
                running = []
                self._log(logged, pbar)
            evaluate_now = (args.evaluation_strategy == "steps" and step % (args.eval_steps or args.logging_steps) == 0) or (
                args.evaluation_strategy == "epoch" and batches.epoch > epoch
            )
            if evaluate_now and self.eval_dataset is not None:
                self._log(dict(self.evaluate(), step=step))
            save_now = (args.save_strategy == "steps" and args.save_steps > 0 and step % args.save_steps == 0) or (
                args.save_strategy == "epoch" and batches.epoch > epoch
            )
            if save_now and step < total:
                checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{step}")
                self.save_model(checkpoint_dir)
                save_train_state(checkpoint_dir, self.state, step, batches.position, self.log_history)
        pbar.close()
        self.close_loggers()
        out = dict(self.log_history[-1]) if self.log_history else {}
        out["train_runtime"] = time.time() - t0
        return out

    def _build_train_step(self) -> Callable:
        """The jitted train step; with ``self.mesh`` the state is sharded by the model family's
        partition rules, batches on (data, fsdp), and the step is jitted with those shardings."""
        step = make_train_step(self.loss_fn, self.args.gradient_accumulation_steps)
        if self.mesh is None:
            return step
        from rljax.sharding import (
            batch_sharding,
            batch_size_divisor,
            jit_sharded,
            replicated,
            shard_state,
            state_shardings,
        )

        if self.args.per_device_train_batch_size % batch_size_divisor(self.mesh):
            raise ValueError(
                f"per_device_train_batch_size={self.args.per_device_train_batch_size} must be a multiple of the mesh's "
                f"data x fsdp size ({batch_size_divisor(self.mesh)}) to shard batches."
            )
        self.state = shard_state(self.state, self.mesh)
        shardings = state_shardings(self.state, self.mesh)
        return jit_sharded(
            step, self.mesh, in_shardings=(shardings, batch_sharding(self.mesh)),
            out_shardings=(shardings, replicated(self.mesh)), donate_argnums=(0,),
        )

    def _place_batch(self, batch: Dict[str, np.ndarray]):
        if self.mesh is None:
            return batch
        from rljax.sharding import shard_batch

        return shard_batch(batch, self.mesh)

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Mean of the loss function's metrics over ``eval_dataset`` (keys prefixed ``eval_``)."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None or len(ds) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.loss_fn)
        batches = BatchIterator(ds, min(self.args.per_device_eval_batch_size, len(ds)), shuffle=False, num_epochs=1)
        sums: Dict[str, float] = {}
        for examples in batches:
            m = jax.device_get(self._eval_step(self.params, self.collate(examples)))
            for k, v in m.items():  # batch means, weighted by the batch's size
                sums[k] = sums.get(k, 0.0) + float(v) * len(examples)
        out = {f"{metric_key_prefix}_{k}": v / len(ds) for k, v in sums.items()}
        self.log_history.append(dict(out))
        return out

    def save_model(self, output_dir: Optional[str] = None) -> None:
        """Write the model in HF format (config.json + safetensors) to ``output_dir``."""
        self._save(output_dir or self.args.output_dir)


def resolve_model(model: Any, params: Any = None, dtype=None):
    """Accept what TRL users pass as ``model`` and return ``(module, params)``.

    ``model`` may be a checkpoint path / hub id (loaded with ``rljax.models.from_pretrained``),
    a ``(module, params)`` tuple, a flax module with ``params=`` given, or an object with
    ``.module`` and ``.params`` attributes.
    """
    if isinstance(model, str):
        from rljax.models import from_pretrained

        module, loaded = from_pretrained(model, dtype=dtype)
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
    next train step donates the state)."""
    from rljax.checkpoint import Checkpointer

    extra = {"step": int(step), "data_position": int(data_position), "log_history": [dict(h) for h in log_history]}
    with Checkpointer(os.path.join(checkpoint_dir, TRAIN_STATE_DIR), async_save=False, overwrite=True) as ck:
        ck.save(int(step), state, extra, force=True)


def find_resume_checkpoint(path: str) -> str:
    """The ``checkpoint-<step>`` directory to resume from: ``path`` itself when it holds a
    train state, else the newest ``checkpoint-<step>`` inside ``path`` that holds one."""
    if os.path.isdir(os.path.join(path, TRAIN_STATE_DIR)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from_checkpoint: {path!r} is not a directory.")
    found = []
    for name in os.listdir(path):
        head, _, tail = name.partition("-")
        if head == "checkpoint" and tail.isdigit() and os.path.isdir(os.path.join(path, name, TRAIN_STATE_DIR)):
            found.append((int(tail), name))
    if not found:
        raise FileNotFoundError(
            f"resume_from_checkpoint: no checkpoint-<step>/{TRAIN_STATE_DIR} in {path!r}; checkpoints are written every "
            "save_steps updates (save_strategy='steps') by Trainer.train."
        )
    return os.path.join(path, max(found)[1])


def restore_train_state(checkpoint_dir: str, template: TrainState):
    """``(state, extra)`` from ``checkpoint_dir/train_state`` into the structure of ``template``."""
    from rljax.checkpoint import Checkpointer

    with Checkpointer(os.path.join(checkpoint_dir, TRAIN_STATE_DIR), resume=True, async_save=False) as ck:
        return ck.restore(target_state=template)
