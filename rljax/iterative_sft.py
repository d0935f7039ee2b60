"""Iterative SFT, functional core: the token-weighted loss builder. The TRL-style shell is
:class:`rljax.trainers.iterative_sft.IterativeSFTTrainer`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from rljax.losses import get_batch_logps


def make_iterative_sft_loss(module: Any) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` (``[b, L]``, -100 = not
    counted) and ``loss_weight`` (``[b]``). Loss = ``-sum_rows(loss_weight * summed token
    log-prob of the row)``; with ``loss_weight = accum / tokens in the minibatch`` the
    micro-batch mean that :func:`rljax.trainers.base.make_train_step` takes is the token mean
    over the whole minibatch. ``rng=None``: deterministic (evaluation).
    """

    def loss_fn(params, batch, rng):
        kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
        out = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=rng is None, **kwargs
        )
        row_logps = get_batch_logps(out.logits, batch["labels"])
        loss = -jnp.sum(row_logps * batch["loss_weight"])
        return loss, {}

    return loss_fn


_SHELL = ('IterativeSFTTrainer',)


def __getattr__(name: str):
    # The TRL-style shell moved to rljax.trainers.iterative_sft; the old import path keeps working.
    if name in _SHELL:
        import importlib

        return getattr(importlib.import_module("rljax.trainers.iterative_sft"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
