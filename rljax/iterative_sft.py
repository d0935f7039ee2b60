"""Iterative SFT, functional core: the token-weighted loss builder. The TRL-style shell is
:class:`rljax.trainers.iterative_sft.IterativeSFTTrainer`.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from rljax.core import logprobs_from_logits
from rljax.losses import get_batch_logps
from rljax.models.t5 import shift_right


def seq2seq_row_logps(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> jax.Array:
    """``[b]`` summed log-probs of the decoder targets ``labels [b, T]`` under ``logits [b, T, V]``
    (no shift: the decoder read the labels shifted right); ``ignore_index`` positions do not count."""
    chex.assert_equal_shape_prefix([logits, labels], 2)
    counted = labels != ignore_index
    per_token = logprobs_from_logits(logits, jnp.where(counted, labels, 0))
    return jnp.sum(jnp.where(counted, per_token, 0.0), axis=-1)


def make_iterative_sft_loss(module: Any) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` (``[b, L]``, -100 = not
    counted) and ``loss_weight`` (``[b]``). Loss = ``-sum_rows(loss_weight * summed token
    log-prob of the row)``; with ``loss_weight = accum / tokens in the minibatch`` the
    micro-batch mean that :func:`rljax.trainers.base.make_train_step` takes is the token mean
    over the whole minibatch. ``rng=None``: deterministic (evaluation).

    Encoder-decoder ``module`` (T5; transformers' seq2seq loss, TRL's ``is_encoder_decoder``
    path): ``input_ids`` / ``attention_mask`` ``[b, S]`` are the encoder input and ``labels``
    ``[b, T]`` the decoder targets (their own width); the decoder reads the labels shifted
    right behind ``decoder_start_token_id`` and each position scores its own label.
    """
    encoder_decoder = bool(getattr(module, "is_encoder_decoder", False))

    def loss_fn(params, batch, rng):
        kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
        if encoder_decoder:
            cfg = module.config
            decoder_input_ids = shift_right(batch["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
            out = module.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               decoder_input_ids=decoder_input_ids, deterministic=rng is None, **kwargs)
            row_logps = seq2seq_row_logps(out.logits, batch["labels"])
        else:
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
