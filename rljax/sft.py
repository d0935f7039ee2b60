"""Supervised fine-tuning, functional core: the SFT loss builder (masked next-token
cross-entropy with optional NEFTune noise). The TRL-style shell is
:class:`rljax.trainers.sft.SFTTrainer`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from rljax.losses import sft_loss_and_count


def make_sft_loss(module: Any, neftune_noise_alpha: Optional[float] = None) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for SFT.

    ``batch``: input_ids, attention_mask, labels, each ``[batch, seq]``; ``rng=None`` means
    evaluation (deterministic, no dropout, no NEFTune noise).
    """

    def loss_fn(params, batch, rng):
        train = rng is not None
        kwargs = {}
        if train:
            kwargs["rngs"] = {"dropout": rng, "neftune": jax.random.fold_in(rng, 1)}
            if neftune_noise_alpha:
                kwargs["neftune_noise_alpha"] = neftune_noise_alpha
        out = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=not train, **kwargs
        )
        loss, count = sft_loss_and_count(out.logits, batch["labels"])
        return loss, {"num_tokens": count}

    return loss_fn


_SHELL = ('SFTConfig', 'SFTTrainer')


def __getattr__(name: str):
    # The TRL-style shell moved to rljax.trainers.sft; the old import path keeps working.
    if name in _SHELL:
        import importlib

        return getattr(importlib.import_module("rljax.trainers.sft"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
