"""Supervised fine-tuning, functional core: the SFT loss builder (masked next-token
cross-entropy with optional NEFTune noise on the input embeddings). The TRL-style shell is
:class:`rljax.trainers.sft.SFTTrainer`.

NEFTune (Jain et al. 2023, as transformers' ``neftune_post_forward_hook``): during training
only, the token embeddings get ``uniform(-m, m)`` noise with ``m = alpha / sqrt(L * d)``
(``d`` the hidden size, ``L`` the sequence length). The noise is added to the output of the
model's input-embedding module (``wte`` / ``embed_tokens`` / ``embed_in`` /
``word_embeddings``) through a Flax method interceptor, so no model file changes. ``L`` is the
longest attended row of the batch, which is the padded width TRL's collator gives (it pads to
the longest row), independent of rljax's bucketed padding.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.losses import sft_loss_and_count

#: Names of the token-embedding module in the model families (HF's ``get_input_embeddings``).
INPUT_EMBEDDING_NAMES = ("wte", "embed_tokens", "embed_in", "word_embeddings")


def neftune_noise(embeddings: jax.Array, alpha: float, rng: jax.Array, seq_len: Any = None) -> jax.Array:
    """``embeddings`` ``[batch, seq, hidden]`` plus NEFTune noise ``uniform(-m, m)``,
    ``m = alpha / sqrt(seq_len * hidden)``; ``seq_len`` defaults to ``seq`` (may be traced)."""
    seq_len = embeddings.shape[1] if seq_len is None else seq_len
    dims = jnp.asarray(seq_len, jnp.float32) * embeddings.shape[-1]
    mag = alpha / jnp.sqrt(dims)
    noise = jax.random.uniform(rng, embeddings.shape, jnp.float32, -1.0, 1.0) * mag
    return (embeddings.astype(jnp.float32) + noise).astype(embeddings.dtype)


def _is_input_embedding(context: Any) -> bool:
    return (
        isinstance(context.module, nn.Embed)
        and context.method_name == "__call__"
        and context.module.name in INPUT_EMBEDDING_NAMES
    )


@contextlib.contextmanager
def neftune(alpha: Optional[float], rng: Optional[jax.Array], seq_len: Any = None, capture: Optional[List] = None):
    """Context in which every ``module.apply`` adds NEFTune noise to the input embeddings.

    ``alpha`` None/0 or ``rng`` None: no noise (evaluation). ``capture``: a list that receives
    each (noised) input-embedding output, for inspection. Raises ValueError after the block if
    noise was requested but no input embedding ran (a model family with other names).
    """
    noisy = bool(alpha) and rng is not None
    calls: List[int] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if not _is_input_embedding(context):
            return out
        if noisy:
            out = neftune_noise(out, alpha, jax.random.fold_in(rng, len(calls)), seq_len)
        calls.append(1)
        if capture is not None:
            capture.append(out)
        return out

    if not noisy and capture is None:
        yield
        return
    with nn.intercept_methods(interceptor):
        yield
    if noisy and not calls:
        raise ValueError(
            "neftune_noise_alpha is set but the model has no input embedding module named one of "
            f"{INPUT_EMBEDDING_NAMES}; NEFTune cannot be applied to this model."
        )


def input_embeddings(
    module: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: Optional[jax.Array] = None,
    *,
    neftune_noise_alpha: Optional[float] = None,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """The token embeddings ``[batch, seq, hidden]`` the model computes for ``input_ids``, with
    NEFTune noise when ``neftune_noise_alpha`` and ``rng`` are given (what training sees).
    Runs one forward pass."""
    input_ids = jnp.asarray(input_ids)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    seen: List[jax.Array] = []
    with neftune(neftune_noise_alpha, rng, jnp.max(jnp.sum(mask, axis=-1)), capture=seen):
        module.apply({"params": params}, input_ids, mask)
    if not seen:
        raise ValueError(f"the model has no input embedding module named one of {INPUT_EMBEDDING_NAMES}.")
    return seen[0]


def make_sft_loss(module: Any, neftune_noise_alpha: Optional[float] = None) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for SFT.

    ``batch``: input_ids, attention_mask, labels, each ``[batch, seq]``; ``rng=None`` means
    evaluation (deterministic: no dropout, no NEFTune noise). ``neftune_noise_alpha``: see
    the module docstring. ``metrics["num_tokens"]``: tokens counted in the loss.
    """
    if neftune_noise_alpha is not None and neftune_noise_alpha < 0:
        raise ValueError(f"neftune_noise_alpha must be >= 0, got {neftune_noise_alpha}.")

    def loss_fn(params, batch, rng):
        train = rng is not None
        kwargs = {"rngs": {"dropout": rng}} if train else {}
        noise_rng = jax.random.fold_in(rng, 1) if train else None
        seq_len = jnp.max(jnp.sum(batch["attention_mask"], axis=-1))
        with neftune(neftune_noise_alpha, noise_rng, seq_len):
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
