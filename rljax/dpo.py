"""Direct Preference Optimisation, functional core (the TRL-style shell is
:class:`rljax.trainers.dpo.DPOTrainer`, whose docstring has TRL's metric semantics).

* :func:`make_dpo_loss` builds ``loss_fn(params, batch, rng) -> (loss, metrics)``: one
  forward of the policy over chosen-then-rejected rows (``2B`` rows), sequence log-probs
  with :func:`get_batch_logps`, then :func:`rljax.losses.dpo_loss`. Reference log-probs
  arrive in the batch (``reference_chosen_logps`` / ``reference_rejected_logps``, ``[B]``),
  so reference params are never closed over.
* :func:`make_reference_logps_fn`: the jitted ``(ref_params, batch) -> (chosen, rejected)``.
* Batch (decoder-only): ``chosen_{input_ids,attention_mask,labels}`` and ``rejected_*``
  (``[B, L]`` int32). Encoder-decoder models (T5; TRL's ``is_encoder_decoder`` path):
  ``prompt_input_ids`` / ``prompt_attention_mask`` ``[B, P]`` (the encoder input, any
  padding) and ``chosen_labels`` / ``rejected_labels`` ``[B, T]`` (the decoder targets,
  right-padded with ``label_pad_token_id``); the decoder reads the labels shifted right
  behind ``decoder_start_token_id`` (HF's ``prepare_decoder_input_ids_from_labels``) and
  the log-probs are NOT shifted (:func:`seq2seq_batch_logps`).
  The encoder runs once per prompt (TRL runs it on the prompt repeated for both answers:
  the same numbers).
* Compute only what is used (decoder-only): a batch may carry ``chosen_completion_positions``
  / ``rejected_completion_positions`` (``[B, W]`` int32, one common static ``W``; built on the
  host by :func:`add_completion_positions`, as :class:`~rljax.trainers.dpo.DPOTrainer`'s
  collation does): the columns whose logits score a counted label. The LM head and the
  log-softmax then run on those ``W`` columns only (a gather of the last hidden states), not on
  all ``L``: TRL masks the prompt, so its logits were computed for nothing. TRL's
  ``logits/*`` metrics (the mean logit over every position, prompt and pads included) come
  exactly from one more head column per row, the head applied to the row's mean hidden state
  (the head is affine). Same numbers, fewer FLOPs. Without the keys: the head on every column.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rljax.losses import DPO_LOSS_TYPES, dpo_loss, get_batch_logps
from rljax.models.attention import CausalLM
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
#: The four batch keys of an encoder-decoder pair batch.
_SEQ2SEQ_KEYS = ("prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels")
#: Optional (decoder-only): the columns whose logits score a counted label (see the module docstring).
_POSITION_KEYS = ("chosen_completion_positions", "rejected_completion_positions")


def is_encoder_decoder(module: Any) -> bool:
    """True for an encoder-decoder model (T5, its value-head or LoRA wrappers)."""
    return bool(getattr(module, "is_encoder_decoder", False))


def pair_keys(module: Any) -> Tuple[str, ...]:
    """The batch keys the DPO forward of ``module`` reads (decoder-only or encoder-decoder)."""
    return _SEQ2SEQ_KEYS if is_encoder_decoder(module) else _PAIR_KEYS


def completion_positions(labels: Any, label_pad_token_id: int = -100, width: Optional[int] = None) -> np.ndarray:
    """Host side: for right-padded decoder-only ``labels [N, L]``, the columns ``t`` whose logits
    score a counted label (``labels[:, t + 1] != label_pad_token_id``), left-aligned per row and
    padded with -1: ``[N, width]`` int32 (``width`` None: the longest row's count, at least 1)."""
    labels = np.asarray(labels)
    scored = labels[:, 1:] != label_pad_token_id
    counts = scored.sum(axis=1)
    width = max(int(counts.max(initial=0)), 1) if width is None else int(width)
    if width < int(counts.max(initial=0)):
        raise ValueError(f"width={width} is less than the {int(counts.max())} scored positions of a row.")
    # stable sort: scored columns first, in order; the rest become -1
    order = np.argsort(~scored, axis=1, kind="stable")[:, :width].astype(np.int32)
    pad = np.arange(order.shape[1])[None, :] >= counts[:, None]
    out = np.where(pad, -1, order).astype(np.int32)
    if out.shape[1] < width:
        out = np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=-1)
    return out


def add_completion_positions(
    batch: Dict[str, Any], label_pad_token_id: int = -100, pad_to_multiple_of: Optional[int] = None
) -> Dict[str, Any]:
    """Host side: ``batch`` (decoder-only pair layout) plus ``chosen_completion_positions`` /
    ``rejected_completion_positions`` ``[B, W]`` (:func:`completion_positions`), so the DPO
    forward runs the LM head on ``W`` columns instead of ``L``. ``W`` is the batch's largest
    count of scored tokens rounded up to ``pad_to_multiple_of`` (None: rljax.data's default
    bucket), capped at ``L - 1``: a handful of static widths, so a run compiles a few programs."""
    from rljax.data import DEFAULT_PAD_MULTIPLE, bucket_length

    chosen, rejected = np.asarray(batch["chosen_labels"]), np.asarray(batch["rejected_labels"])
    scored = max(int(np.sum(x[:, 1:] != label_pad_token_id, axis=1).max(initial=0)) for x in (chosen, rejected))
    multiple = DEFAULT_PAD_MULTIPLE if pad_to_multiple_of is None else int(pad_to_multiple_of)
    width = bucket_length(scored, multiple, max(chosen.shape[1] - 1, 1))
    return dict(batch, chosen_completion_positions=completion_positions(chosen, label_pad_token_id, width),
                rejected_completion_positions=completion_positions(rejected, label_pad_token_id, width))


def _trunk_output_interceptor(transform: Callable, fired: list) -> Callable:
    """A flax method interceptor that replaces the last hidden states a ``CausalLM``'s trunk
    returns by ``transform(hidden)``, so its LM head (tied, untied, LoRA, quantized: whatever
    the family runs) reads only those rows. ``fired`` records that it ran."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        parent = getattr(mod, "parent", None)
        if context.method_name == "__call__" and isinstance(parent, CausalLM) and mod.name == parent.trunk_name:
            hidden, cache, embed = next_fun(*args, **kwargs)
            fired.append(True)
            return transform(hidden), cache, embed
        return next_fun(*args, **kwargs)

    return interceptor


def _concatenated_rows(batch: Dict[str, jax.Array]) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """``input_ids``, ``attention_mask``, ``labels`` of the chosen then the rejected rows, each
    ``[2B, L]``, constrained so that on a mesh the 2B rows stay split over the batch axes."""
    ids, mask, labels = (jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
                         for k in ("input_ids", "attention_mask", "labels"))
    return constrain_batch((ids, mask, labels))


def completion_forward(
    module: Any,
    params: Any,
    batch: Dict[str, jax.Array],
    *,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    rng: Optional[jax.Array] = None,
    logits_width: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """:func:`concatenated_forward` with the LM head on the completion columns only (the batch
    carries ``*_completion_positions``, see the module docstring). Returns ``(chosen_logps [B],
    rejected_logps [B], row_logit_means)``: with ``logits_width`` (a traced int), ``[2B]`` the mean
    logit of each row over its first ``logits_width`` positions and the whole vocabulary (TRL's
    ``logits/*`` metrics, pads included), else None."""
    ids, mask, labels = _concatenated_rows(batch)
    cols = constrain_batch(jnp.concatenate([batch[k] for k in _POSITION_KEYS], axis=0).astype(jnp.int32))
    chex.assert_equal_shape([ids, mask, labels])
    chex.assert_equal_shape_prefix([ids, cols], 1)
    seq, width = ids.shape[1], cols.shape[1]
    valid = cols >= 0
    safe = jnp.clip(cols, 0, seq - 1)

    def head_rows(hidden):  # [2B, L, D] -> [2B, W (+1), D]
        rows = jnp.take_along_axis(hidden, safe[..., None], axis=1)
        if logits_width is None:
            return rows
        keep = (jnp.arange(seq) < logits_width).astype(jnp.float32)
        mean = jnp.einsum("bld,l->bd", jax.lax.stop_gradient(hidden).astype(jnp.float32), keep) / logits_width
        return jnp.concatenate([rows, mean[:, None].astype(hidden.dtype)], axis=1)

    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), ids.shape)  # as concatenated_forward
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    fired: list = []
    with nn.intercept_methods(_trunk_output_interceptor(head_rows, fired)):
        out = module.apply({"params": params}, ids, mask, positions, deterministic=rng is None, **kwargs)
    logits = out.logits
    if not fired:  # not a CausalLM (no trunk to read): the head ran on every column; same numbers
        full = logits
        logits = jnp.take_along_axis(full, safe[..., None], axis=1)
        if logits_width is not None:
            keep = (jnp.arange(seq) < logits_width).astype(full.dtype)
            mean = jnp.einsum("blv,l->b", jax.lax.stop_gradient(full), keep) / (logits_width * full.shape[-1])
    elif logits_width is not None:
        logits, mean = logits[:, :width], jnp.mean(jax.lax.stop_gradient(logits[:, width]), axis=-1)
    # the logits at column t score the label at t + 1: no shift left to do
    scored = jnp.take_along_axis(labels, jnp.clip(cols + 1, 0, seq - 1), axis=1)
    scored = jnp.where(valid, scored, label_pad_token_id)
    logps = get_batch_logps(logits, scored, average_log_prob, label_pad_token_id, is_encoder_decoder=True)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:], (None if logits_width is None else mean)


def seq2seq_batch_logps(
    logits: jax.Array,
    labels: jax.Array,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
) -> jax.Array:
    """TRL's ``get_batch_logps(..., is_encoder_decoder=True)``: ``[B]`` summed
    (``average_log_prob``: averaged) log-probs of ``labels [B, T]`` (``label_pad_token_id`` = not
    counted) under ``logits [B, T, V]``, WITHOUT the shift of :func:`get_batch_logps`:
    ``logits[:, t]`` scores ``labels[:, t]`` (the decoder read the labels shifted right)."""
    return get_batch_logps(logits, labels, average_log_prob, label_pad_token_id, is_encoder_decoder=True)


def decoder_inputs_from_labels(labels: jax.Array, config: Any, label_pad_token_id: int = -100) -> jax.Array:
    """HF's ``prepare_decoder_input_ids_from_labels`` (T5's ``_shift_right``): ``labels [B, T]``
    shifted right behind ``config.decoder_start_token_id``, ``label_pad_token_id`` -> the pad id."""
    start, pad = config.decoder_start_token_id, config.pad_token_id
    if start is None or pad is None:
        raise ValueError("The encoder-decoder config needs decoder_start_token_id and pad_token_id (T5: 0 and 0) "
                         f"to build decoder inputs from labels; got {start} and {pad}.")
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start), labels[:, :-1]], axis=1)
    return jnp.where(shifted == label_pad_token_id, pad, shifted).astype(jnp.int32)


def seq2seq_concatenated_forward(
    module: Any,
    params: Any,
    batch: Dict[str, jax.Array],
    *,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    rng: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """TRL's ``concatenated_forward`` for an encoder-decoder ``module`` (see the module
    docstring for the batch). The encoder runs once on the ``B`` prompts; the decoder runs
    on the chosen, then the rejected labels (shifted right), both against that encoder
    output. No decoder attention mask, as TRL (the decoder is causal and labels are
    right-padded, so pads never reach a counted position). Returns ``(chosen_logps [B],
    rejected_logps [B], chosen_logits [B, T, V], rejected_logits [B, T, V])``."""
    prompt, prompt_mask = constrain_batch((batch["prompt_input_ids"], batch["prompt_attention_mask"]))
    chosen, rejected = constrain_batch((batch["chosen_labels"], batch["rejected_labels"]))
    chex.assert_rank([prompt, prompt_mask, chosen, rejected], 2)
    chex.assert_equal_shape([prompt, prompt_mask])
    chex.assert_equal_shape([chosen, rejected])
    cfg = module.config
    det = rng is None

    def call(rngs_key, **kwargs):
        extra = {} if rngs_key is None else {"rngs": {"dropout": rngs_key}}
        return module.apply({"params": params}, attention_mask=prompt_mask, deterministic=det, **kwargs, **extra)

    out_c = call(rng, input_ids=prompt, decoder_input_ids=decoder_inputs_from_labels(chosen, cfg, label_pad_token_id))
    out_r = call(None if det else jax.random.fold_in(rng, 1), encoder_hidden_states=out_c.encoder_hidden_states,
                 decoder_input_ids=decoder_inputs_from_labels(rejected, cfg, label_pad_token_id))
    kw = {"average_log_prob": average_log_prob, "label_pad_token_id": label_pad_token_id}
    return (seq2seq_batch_logps(out_c.logits, chosen, **kw), seq2seq_batch_logps(out_r.logits, rejected, **kw),
            out_c.logits, out_r.logits)


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
    each ``[B, L]``, right-padded (as TRL's collator pads them). ``rng`` None: deterministic (no
    dropout). Returns ``(chosen_logps [B], rejected_logps [B], logits [2B, L, V])`` (the head on
    every column, as TRL; the loss uses :func:`completion_forward` when the batch allows). An
    encoder-decoder ``module`` reads the encoder-decoder batch instead
    (:func:`seq2seq_concatenated_forward`; logits ``[2B, T, V]``).
    """
    if is_encoder_decoder(module):
        pc, pr, lc, lr = seq2seq_concatenated_forward(
            module, params, batch, average_log_prob=average_log_prob, label_pad_token_id=label_pad_token_id, rng=rng)
        return pc, pr, jnp.concatenate([lc, lr], axis=0)
    ids, mask, labels = _concatenated_rows(batch)
    # Rows are right-padded: arange positions equal cumsum(mask) - 1 on every real token, and
    # give pad positions the logits transformers gives them (TRL's logits/* metrics count pads).
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    out = module.apply({"params": params}, ids, mask, positions, deterministic=rng is None, **kwargs)
    logps = get_batch_logps(out.logits, labels, average_log_prob, label_pad_token_id)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:], out.logits


def _trl_width(batch: Dict[str, jax.Array], encoder_decoder: bool, label_pad_token_id: int) -> jax.Array:
    """The width TRL's dynamic padding gives the logits: the longest row of the whole
    (chosen + rejected) batch, counted in tokens (decoder-only) or in labels (encoder-decoder)."""
    if encoder_decoder:
        rows = [batch["chosen_labels"] != label_pad_token_id, batch["rejected_labels"] != label_pad_token_id]
    else:
        rows = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
    return jnp.maximum(*(jnp.max(jnp.sum(r.astype(jnp.int32), axis=-1)) for r in rows))


def _trl_logits_mean(logits: jax.Array, width: jax.Array) -> jax.Array:
    """Mean of ``logits [B, L, V]`` over the first ``width`` positions (see ``_trl_width``)."""
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

    encoder_decoder = is_encoder_decoder(module)

    def loss_fn(params, batch, rng):
        kw = dict(average_log_prob=loss_type == "ipo", label_pad_token_id=label_pad_token_id,
                  rng=None if disable_dropout else rng)
        width = _trl_width(batch, encoder_decoder, label_pad_token_id)
        if not encoder_decoder and all(k in batch for k in _POSITION_KEYS):  # the head on the completions only
            pc, pr, means = completion_forward(module, params, batch, logits_width=width, **kw)
            logits_chosen, logits_rejected = jnp.mean(means[: pc.shape[0]]), jnp.mean(means[pc.shape[0]:])
        else:
            if encoder_decoder:
                pc, pr, chosen_logits, rejected_logits = seq2seq_concatenated_forward(module, params, batch, **kw)
            else:
                pc, pr, logits = concatenated_forward(module, params, batch, **kw)
                chosen_logits, rejected_logits = logits[: pc.shape[0]], logits[pc.shape[0]:]
            logits_chosen = _trl_logits_mean(jax.lax.stop_gradient(chosen_logits), width)
            logits_rejected = _trl_logits_mean(jax.lax.stop_gradient(rejected_logits), width)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc, pr, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
            beta=beta, label_smoothing=label_smoothing if loss_type == "sigmoid" else 0.0,  # others ignore it
            loss_type=loss_type, reference_free=reference_free,
        )
        metrics = {
            "rewards/chosen": jnp.mean(chosen_rewards),
            "rewards/rejected": jnp.mean(rejected_rewards),
            "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
            "logps/rejected": jax.lax.stop_gradient(jnp.mean(pr)),
            "logps/chosen": jax.lax.stop_gradient(jnp.mean(pc)),
            "logits/rejected": logits_rejected,
            "logits/chosen": logits_chosen,
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

    pairs = pair_keys(module)

    def keys_of(batch) -> Tuple[str, ...]:
        windowed = not is_encoder_decoder(module) and all(k in batch for k in _POSITION_KEYS)
        return pairs + _POSITION_KEYS if windowed else pairs

    def reference_logps(ref_params, batch):
        kw = {"average_log_prob": average_log_prob, "label_pad_token_id": label_pad_token_id}
        if len(keys_of(batch)) > len(pairs):  # the head on the completion columns only
            rc, rr, _ = completion_forward(module, ref_params, batch, **kw)
        else:
            rc, rr, _ = concatenated_forward(module, ref_params, {k: batch[k] for k in pairs}, **kw)
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)

    if mesh is None:
        single = jax.jit(reference_logps)

        def on_device(ref_params, batch):
            return single(ref_params, {k: batch[k] for k in keys_of(batch)})

        on_device.lower = lambda ref_params, batch: single.lower(ref_params, {k: batch[k] for k in keys_of(batch)})
        return on_device
    compiled: Dict[Any, Callable] = {}

    def jitted(ref_params, batch) -> Callable:
        rows = int(jnp.shape(batch[pairs[-1]])[0])
        leaves, treedef = jax.tree_util.tree_flatten(ref_params)
        key = (treedef, tuple(jnp.shape(x) for x in leaves), rows % batch_size_divisor(mesh) == 0)
        if key not in compiled:
            rows_sh = batch_sharding(mesh) if key[-1] else replicated(mesh)
            compiled[key] = jit_sharded(
                reference_logps, mesh, in_shardings=(param_shardings(ref_params, mesh), rows_sh), out_shardings=rows_sh
            )
        return compiled[key]

    def on_mesh(ref_params, batch):
        batch = {k: batch[k] for k in keys_of(batch)}
        return jitted(ref_params, batch)(ref_params, batch)

    def lower(ref_params, batch):
        batch = {k: batch[k] for k in keys_of(batch)}
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
