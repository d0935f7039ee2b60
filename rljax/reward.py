"""Reward modelling, functional core: the Bradley-Terry loss builder over a sequence-score
model and the jitted reward function used by PPO. The TRL-style shell is
:class:`rljax.trainers.reward.RewardTrainer`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from rljax.losses import reward_loss


def make_reward_loss(module: Any) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for pairwise reward modelling
    (batch: see the module docstring; ``rng=None`` means evaluation, no dropout)."""

    def loss_fn(params, batch, rng):
        n = batch["input_ids_chosen"].shape[0]
        ids = jnp.concatenate([batch["input_ids_chosen"], batch["input_ids_rejected"]], axis=0)
        mask = jnp.concatenate([batch["attention_mask_chosen"], batch["attention_mask_rejected"]], axis=0)
        kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
        out = module.apply({"params": params}, ids, mask, deterministic=rng is None, **kwargs)
        rewards = out.logits[:, 0]
        chosen, rejected = rewards[:n], rewards[n:]
        loss = reward_loss(chosen, rejected, batch.get("margin"))
        chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
        metrics = {
            "accuracy": jnp.mean((chosen >= rejected).astype(jnp.float32)),
            "accuracy_strict": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "rewards_chosen": jnp.mean(chosen),
            "rewards_rejected": jnp.mean(rejected),
        }
        return loss, metrics

    return loss_fn


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
        trunk = {k: v for k, v in params.items() if k not in ("lm_head", "v_head")}
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
