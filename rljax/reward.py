"""Reward modelling, functional core: the Bradley-Terry loss builder over a sequence-score
model and the jitted reward function used by PPO. The TRL-style shell is
:class:`rljax.trainers.reward.RewardTrainer`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax.losses import reward_loss


def pair_rewards(module: Any, params: Any, batch: Dict[str, jax.Array], rng: Optional[jax.Array] = None):
    """``(r_chosen [B], r_rejected [B])``: one forward over the ``2B`` chosen-then-rejected rows
    (TRL runs two forwards; same numbers). ``rng=None``: deterministic (no dropout)."""
    n = batch["input_ids_chosen"].shape[0]
    ids = jnp.concatenate([batch["input_ids_chosen"], batch["input_ids_rejected"]], axis=0)
    mask = jnp.concatenate([batch["attention_mask_chosen"], batch["attention_mask_rejected"]], axis=0)
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    rewards = module.apply({"params": params}, ids, mask, deterministic=rng is None, **kwargs).logits[:, 0]
    return rewards[:n], rewards[n:]


def _loss_and_metrics(chosen: jax.Array, rejected: jax.Array, margin: Optional[jax.Array]):
    loss = reward_loss(chosen, rejected, margin)
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    metrics = {
        "accuracy": jnp.mean((chosen >= rejected).astype(jnp.float32)),
        "accuracy_strict": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "rewards_chosen": jnp.mean(chosen),
        "rewards_rejected": jnp.mean(rejected),
    }
    return loss, metrics


def make_reward_loss(module: Any) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for pairwise reward modelling
    (batch: see the module docstring; ``rng=None`` means evaluation, no dropout)."""

    def loss_fn(params, batch, rng):
        chosen, rejected = pair_rewards(module, params, batch, rng)
        return _loss_and_metrics(chosen, rejected, batch.get("margin"))

    return loss_fn


def make_reward_predict(module: Any) -> Callable:
    """``predict(params, batch) -> (metrics incl. loss, predictions [B, 2], labels [B])``, TRL's
    ``RewardTrainer.prediction_step``: predictions are ``softmax([r_chosen, r_rejected])`` per
    pair, labels are 0 (the chosen side)."""

    def predict(params, batch):
        chosen, rejected = pair_rewards(module, params, batch)
        loss, metrics = _loss_and_metrics(chosen, rejected, batch.get("margin"))
        preds = jax.nn.softmax(jnp.stack([chosen, rejected], axis=-1), axis=-1)
        return dict(metrics, loss=loss), preds, jnp.zeros(chosen.shape, jnp.int32)

    return predict


def compute_accuracy(eval_pred) -> Dict[str, float]:
    """TRL's ``compute_accuracy``: the share of rows whose argmax of ``predictions [N, 2]`` equals
    the label (``eval_pred`` unpacks as ``(predictions, label_ids)``; ties pick column 0, the
    chosen side, with a warning)."""
    predictions, labels = eval_pred
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    ties = int(np.sum(predictions[:, 0] == predictions[:, 1]))
    if ties:
        warnings.warn(
            f"There are {ties} out of {len(predictions)} instances where the predictions for both options are equal. "
            "As a consequence the accuracy can be misleading."
        )
    return {"accuracy": float(np.mean(np.argmax(predictions, axis=1) == labels))}


def as_score_model(model: Any, params: Any = None, *, seed: int = 0) -> Tuple[Any, Any]:
    """Accept what a user passes as a reward model and return ``(SequenceScoreModel, params)``.

    ``model``: a checkpoint path (an HF ``*ForSequenceClassification`` directory, or a
    causal-LM one, which gets a fresh score head), ``(module, params)``, a module with
    ``params``, or an object with ``.module``/``.params``. A causal LM module keeps its
    trunk params and gets a fresh ``score`` (from ``PRNGKey(seed)``).
    """
    from rljax.models import SequenceScoreModel
    from rljax.models.heads import init_score, sequence_score_from_pretrained
    from rljax.trainers.base import resolve_model

    if isinstance(model, str):
        module, loaded = sequence_score_from_pretrained(model, num_labels=1)
        return module, (params if params is not None else loaded)
    module, params = resolve_model(model, params)
    if not isinstance(module, SequenceScoreModel):
        trunk = {k: v for k, v in params.items() if k not in ("lm_head", "embed_out", "v_head")}
        module = SequenceScoreModel(module.config, 1, getattr(module, "dtype", jnp.float32))
        params = {**trunk, **init_score(module, jax.random.PRNGKey(seed))}
    if module.num_labels != 1:
        raise ValueError(
            f"A reward model scores each sequence with ONE number; this score model has num_labels="
            f"{module.num_labels}. Load it with num_labels=1."
        )
    return module, params


def make_reward_fn(module: Any, params: Any = None, *, label_index: Optional[int] = None) -> Callable:
    """A jitted scorer ``(input_ids [B, L], attention_mask [B, L]) -> [B]`` for PPO.

    ``module``/``params``: a :class:`rljax.models.SequenceScoreModel` and its params (or
    anything :func:`as_score_model` accepts). The score is the logit at each row's last
    attended token (left or right padding); ``label_index`` picks a column of a
    multi-label classifier (e.g. 1 for a POSITIVE logit, as TRL's sentiment example).
    The params are an argument of the compiled function, not a constant folded into it.
    """
    from rljax.models import SequenceScoreModel
    from rljax.models.heads import sequence_score_from_pretrained
    from rljax.trainers.base import resolve_model

    if isinstance(module, str):
        module, loaded = sequence_score_from_pretrained(module)  # num_labels from config.json
        params = loaded if params is None else params
    else:
        module, params = resolve_model(module, params)
    if not isinstance(module, SequenceScoreModel):
        raise ValueError(
            f"make_reward_fn needs a SequenceScoreModel, got {type(module).__name__}; train one with "
            "RewardTrainer (or wrap a causal LM with rljax.reward.as_score_model)."
        )
    if label_index is None and module.num_labels != 1:
        raise ValueError(f"The score model has num_labels={module.num_labels}; pass label_index to pick one.")
    index = 0 if label_index is None else int(label_index)
    if not 0 <= index < module.num_labels:
        raise ValueError(f"label_index {index} is out of range for num_labels={module.num_labels}.")

    @jax.jit
    def score(p, input_ids, attention_mask):
        return module.apply({"params": p}, input_ids, attention_mask).logits[:, index]

    def reward_fn(input_ids, attention_mask=None):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return score(params, input_ids, jnp.asarray(attention_mask))

    return reward_fn


_SHELL = ('RewardConfig', 'RewardTrainer', 'REWARD_COLUMNS')


def __getattr__(name: str):
    # The TRL-style shell moved to rljax.trainers.reward; the old import path keeps working.
    if name in _SHELL:
        import importlib

        return getattr(importlib.import_module("rljax.trainers.reward"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
