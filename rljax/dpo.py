"""Direct Preference Optimisation, functional core (the TRL-style shell is
:class:`rljax.trainers.dpo.DPOTrainer`, whose docstring has TRL's metric semantics).

* :func:`make_dpo_loss` builds ``loss_fn(params, batch, rng) -> (loss, metrics)``: one
  forward of the policy over chosen-then-rejected rows (``2B`` rows), sequence log-probs
  with :func:`get_batch_logps`, then :func:`rljax.losses.dpo_loss`. Reference log-probs
  arrive in the batch (``reference_chosen_logps`` / ``reference_rejected_logps``, ``[B]``),
  so reference params are never closed over.
* :func:`make_reference_logps_fn`: the jitted ``(ref_params, batch) -> (chosen, rejected)``.
* Batch: ``chosen_{input_ids,attention_mask,labels}`` and ``rejected_*`` (``[B, L]`` int32).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rljax.losses import DPO_LOSS_TYPES, dpo_loss, get_batch_logps
from rljax.sharding import (
    batch_sharding,
    batch_size_divisor,
    constrain_batch,
    jit_sharded,
    param_shardings,
    replicated,
)

#: The six batch keys of a DPO pair batch (chosen_* then rejected_*).
_PAIR_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels"))


def concatenated_forward(
    module: Any,
    params: Any,
    batch: Dict[str, jax.Array],
    *,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    rng: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One forward over chosen-then-rejected rows (TRL's ``concatenated_forward``).

    ``batch``: ``chosen_*`` / ``rejected_*`` ``input_ids``, ``attention_mask``, ``labels``,
    each ``[B, L]``, right-padded (as TRL's collator pads them). ``rng`` None: deterministic (no dropout). Returns ``(chosen_logps [B],
    rejected_logps [B], logits [2B, L, V])``.
    """
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    labels = jnp.concatenate([batch["chosen_labels"], batch["rejected_labels"]], axis=0)
    ids, mask, labels = constrain_batch((ids, mask, labels))  # on a mesh: the 2B rows stay split
    # Rows are right-padded: arange positions equal cumsum(mask) - 1 on every real token, and
    # give pad positions the logits transformers gives them (TRL's logits/* metrics count pads).
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    out = module.apply({"params": params}, ids, mask, positions, deterministic=rng is None, **kwargs)
    logps = get_batch_logps(out.logits, labels, average_log_prob, label_pad_token_id)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:], out.logits


def _trl_logits_mean(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``logits [B, L, V]`` over the first ``T`` positions, ``T`` = the longest row
    of the whole (chosen + rejected) batch: the width TRL's dynamic padding gives."""
    width = jnp.max(jnp.sum(mask, axis=-1))
    keep = (jnp.arange(logits.shape[1]) < width).astype(logits.dtype)
    total = jnp.sum(jnp.sum(logits, axis=-1) * keep[None, :])
    return total / (logits.shape[0] * width * logits.shape[2])


def make_dpo_loss(
    module: Any,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    reference_free: bool = False,
    label_pad_token_id: int = -100,
    disable_dropout: bool = True,
) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for DPO (see the module docstring
    for the batch). ``rng=None`` means evaluation; with ``disable_dropout`` the policy never
    uses dropout (TRL sets every dropout probability to 0)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {list(DPO_LOSS_TYPES)}.")

    def loss_fn(params, batch, rng):
        pc, pr, logits = concatenated_forward(
            module, params, batch, average_log_prob=loss_type == "ipo", label_pad_token_id=label_pad_token_id,
            rng=None if disable_dropout else rng,
        )
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc, pr, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
            beta=beta, label_smoothing=label_smoothing if loss_type == "sigmoid" else 0.0,  # others ignore it
            loss_type=loss_type, reference_free=reference_free,
        )
        n = pc.shape[0]
        logits = jax.lax.stop_gradient(logits)
        mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
        metrics = {
            "rewards/chosen": jnp.mean(chosen_rewards),
            "rewards/rejected": jnp.mean(rejected_rewards),
            "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
            "logps/rejected": jax.lax.stop_gradient(jnp.mean(pr)),
            "logps/chosen": jax.lax.stop_gradient(jnp.mean(pc)),
            "logits/rejected": _trl_logits_mean(logits[n:], mask),
            "logits/chosen": _trl_logits_mean(logits[:n], mask),
        }
        return jnp.mean(losses), metrics

    return loss_fn


def make_reference_logps_fn(
    module: Any, *, average_log_prob: bool = False, label_pad_token_id: int = -100, mesh: Optional[Any] = None
) -> Callable:
    """Jitted ``(ref_params, batch) -> (reference_chosen_logps [B], reference_rejected_logps [B])``
    (deterministic forward; the params are an argument, never a closure constant).

    ``mesh``: jit on it with ``ref_params`` sharded by the model family's partition rules
    (like the policy; pass params already placed with ``rljax.sharding.shard_params`` to
    avoid a transfer per call) and the batch rows split over ("data", "fsdp"); a batch whose
    rows the batch axes do not divide is replicated instead. The jitted function is built
    once per params structure and batch shape.
    """

    def reference_logps(ref_params, batch):
        rc, rr, _ = concatenated_forward(
            module, ref_params, {k: batch[k] for k in _PAIR_KEYS},
            average_log_prob=average_log_prob, label_pad_token_id=label_pad_token_id,
        )
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)

    if mesh is None:
        return jax.jit(reference_logps)
    compiled: Dict[Any, Callable] = {}

    def jitted(ref_params, batch) -> Callable:
        rows = int(jnp.shape(batch["chosen_input_ids"])[0])
        leaves, treedef = jax.tree_util.tree_flatten(ref_params)
        key = (treedef, tuple(jnp.shape(x) for x in leaves), rows % batch_size_divisor(mesh) == 0)
        if key not in compiled:
            rows_sh = batch_sharding(mesh) if key[-1] else replicated(mesh)
            compiled[key] = jit_sharded(
                reference_logps, mesh, in_shardings=(param_shardings(ref_params, mesh), rows_sh), out_shardings=rows_sh
            )
        return compiled[key]

    def on_mesh(ref_params, batch):
        batch = {k: batch[k] for k in _PAIR_KEYS}
        return jitted(ref_params, batch)(ref_params, batch)

    def lower(ref_params, batch):
        batch = {k: batch[k] for k in _PAIR_KEYS}
        return jitted(ref_params, batch).lower(ref_params, batch)

    on_mesh.lower = lower  # .lower(ref_params, batch).compile(): the program one call runs
    return on_mesh


_SHELL = ('DPOConfig', 'DPOTrainer')


def __getattr__(name: str):
    # The TRL-style shell moved to rljax.trainers.dpo; the old import path keeps working.
    if name in _SHELL:
        import importlib

        return getattr(importlib.import_module("rljax.trainers.dpo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
