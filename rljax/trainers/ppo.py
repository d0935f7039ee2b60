"""TRL 0.7.11's ``PPOTrainer`` as a thin shell over ``rljax.ppo_train``.

The shell owns the host side only: padding lists of token arrays into static
shapes, validating inputs, batching generation, timing and logging. The math
is the pure functions in ``rljax.ppo`` / ``rljax.ppo_train``; the state is a
``PPOTrainState`` pytree at ``trainer.state``.

A TRL script ports by changing imports and turning tensors into arrays::

    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer, dataset=ds)
    for batch in trainer.dataloader:  # one shuffled epoch per loop
        responses = trainer.generate(batch["input_ids"], return_prompt=False, **gen_kwargs)
        stats = trainer.step(batch["input_ids"], responses, scores)
        trainer.log_stats(stats, batch, scores)
    model.save_pretrained("out")  # model.params is the trained state, as TRL's in-place model
"""
from __future__ import annotations

import copy
import os
import re
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.core import check_whiten_mask, convert_to_scalar, logprobs_from_logits, stats_to_np
from rljax.data import bucket_length, pad_sequences
from rljax.generation import check_token_range
from rljax.losses import ppo_loss
from rljax.models.peft import is_peft_module, trainable_mask, with_adapters_enabled
from rljax.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    compute_advantages,
    compute_rewards,
    kl_penalty,
    validate_scores,
)
from rljax.ppo_train import (
    PPOTrainState,
    drop_skipped_epochs,
    freeze_params,
    has_learning_rate,
    make_forward_rollout,
    make_ppo_optimizer,
    make_ppo_step,
    set_learning_rate,
)
from rljax.trainers.base import module_in_dtype

_LAYER = re.compile(r"(?:^|/)(?:h|layers)_(\d+)(?:/|$)")
# What TRL's create_reference_model shares besides the first layers: every parameter registered before
# layer 0 (embeddings, BLOOM's embedding LayerNorm; OPT's projections and its decoder-level final_layer_norm).
_EMBED = re.compile(r"(?:^|/)(?:wte|wpe|embed_tokens|embed_in|embed_positions|project_in|project_out"
                    r"|word_embeddings|word_embeddings_layernorm"
                    r"|decoder/final_layer_norm)(?:/|$)")


# ==========================================================================
# Reference models
# ==========================================================================


def shared_layer_mask(params: Any, num_shared_layers: int) -> Any:
    """Bool pytree: True for the params TRL freezes with ``num_shared_layers=k``
    (embeddings and transformer layers ``0..k-1``)."""
    flat = flatten_dict(params)
    n_layers = 1 + max((int(m.group(1)) for p in flat if (m := _LAYER.search("/".join(p)))), default=-1)
    if not 0 <= num_shared_layers <= n_layers:
        raise ValueError(f"num_shared_layers={num_shared_layers} must be between 0 and the model's {n_layers} layers.")

    def shared(path):
        s = "/".join(path)
        m = _LAYER.search(s)
        return bool(_EMBED.search(s)) or (m is not None and int(m.group(1)) < num_shared_layers)

    return unflatten_dict({p: shared(p) for p in flat})


def create_reference_model(model: Any, num_shared_layers: Optional[int] = None, pattern: Optional[str] = None):
    """A frozen reference for ``model``: a model object of the same kind (``.module``/``.params``).

    ``model``: an ``AutoModelForCausalLMWithValueHead`` (or any object with ``.module`` and
    ``.params``), or a ``(module, params)`` pair (then the result is an
    ``AutoModelForCausalLMWithValueHead``). Without ``num_shared_layers`` the reference holds a
    copy of all params. With ``num_shared_layers=k`` the embeddings and first ``k`` layers are
    not copied: the reference holds the policy's own arrays there (``ref.num_shared_layers = k``
    records it) and ``PPOTrainer(config, model, ref)`` keeps those layers frozen in the policy
    and reads them from the policy at reference time, so they cost no extra memory
    (deliberate difference: TRL 0.7.11 freezes them but keeps a second copy).
    """
    if pattern is not None:
        raise ValueError("Custom layer patterns are not needed in rljax: layers are found by name (h_i / layers_i).")
    source = _as_model_object(model)
    params = source.params
    if num_shared_layers is None:
        ref_params = _copy_tree(params)
    else:
        shared = flatten_dict(shared_layer_mask(params, num_shared_layers))
        ref_params = unflatten_dict(
            {p: (v if shared[p] else jnp.array(v, copy=True)) for p, v in flatten_dict(params).items()}
        )
    ref = _with_params(source, ref_params)
    _set_attr(ref, "num_shared_layers", num_shared_layers)
    return ref


def merge_reference(params: Any, ref_params: Any) -> Any:
    """Full reference params: ``ref_params`` leaves, and the shared ones from ``params``."""
    flat_ref = flatten_dict(ref_params)
    return unflatten_dict({p: flat_ref.get(p, v) for p, v in flatten_dict(params).items()})


def _shares_layers(params: Any, ref_params: Any, num_shared_layers: int) -> bool:
    """Whether ``ref_params`` holds the very arrays of ``params`` in the first ``k`` layers."""
    shared = flatten_dict(shared_layer_mask(params, num_shared_layers))
    flat, flat_ref = flatten_dict(params), flatten_dict(ref_params)
    return all(flat_ref.get(p) is flat[p] for p, s in shared.items() if s)


# ==========================================================================
# Data
# ==========================================================================

# TRL keeps the columns the value-head model's forward takes, plus these (for logging).
_SIGNATURE_COLUMNS = ("input_ids", "past_key_values", "attention_mask", "kwargs", "label", "query", "response")


def default_collate(rows: List[Any]) -> Any:
    """TRL's default (torch ``default_collate``) on numpy: dict rows give a dict of columns and
    tuple rows a list of fields. A field of equal-shape arrays or of numbers is stacked into one
    array; anything else (strings, ragged token arrays) stays a list. Deliberate difference:
    dict columns always stay lists (ragged ``input_ids`` are the rule in PPO; TRL's examples
    pass a list-collator for that), and ragged fields do not raise."""
    first = rows[0]
    if isinstance(first, Mapping):
        return {k: [r[k] for r in rows] for k in first}
    if isinstance(first, tuple) or (isinstance(first, list) and not _is_number(first)):
        return [_collate_field(list(field)) for field in zip(*rows)]
    return _collate_field(rows)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _collate_field(items: List[Any]) -> Any:
    if all(_is_number(x) for x in items):
        return np.asarray(items)
    if all(hasattr(x, "shape") and hasattr(x, "dtype") for x in items):
        arrays = [_to_numpy(x) for x in items]
        if len({a.shape for a in arrays}) == 1:
            return np.stack(arrays)
        return arrays
    return list(items)


class PPODataLoader:
    """TRL's ``DataLoader(dataset, batch_size, shuffle=True, drop_last=True, collate_fn)``.

    Every ``for batch in loader`` is one fresh epoch in a new shuffled order (epoch ``e`` uses
    ``np.random.default_rng([seed, e])``); ``len(loader)`` counts its batches, 0 when the
    dataset is smaller than a batch (``drop_last``). Rows may be dicts or tuples (see
    ``default_collate``); ``collate_fn`` replaces it.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Optional[Callable] = None, *,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"dataset must support len() and indexing (a datasets.Dataset or a list of rows), got {type(dataset).__name__}."
            )
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        self.epoch += 1
        for b in range(len(self)):
            rows = [self.dataset[int(i)] for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            yield self.collate_fn(rows)


# ==========================================================================
# The shell
# ==========================================================================


class PPOTrainer:
    """``PPOTrainer(config, model, ref_model=None, tokenizer=None, dataset=None, optimizer=None,
    data_collator=None, num_shared_layers=None, lr_scheduler=None, mesh=None)``.

    ``model``: an ``AutoModelForCausalLMWithValueHead`` (``.module``, ``.params``) or a
    ``(module, params)`` pair whose module returns ``.logits`` and ``.values``. As in TRL, where
    training updates the model in place, ``model.params`` is the trained state after every
    ``step`` (so ``model.save_pretrained`` saves it). The trainer trains on its own copy and
    donates it to each jitted step: arrays read from ``model.params`` before a step are invalid
    after it; read ``model.params`` again. ``ref_model``: the same kinds,
    ``create_reference_model(model, num_shared_layers=k)``, or None for
    ``create_reference_model(model, num_shared_layers)``. ``optimizer``: an optax
    transformation (default: TRL's Adam); shared layers stay frozen whatever it is.
    ``lr_scheduler``: an optax schedule (any callable ``step -> learning rate``); the ``k``-th
    ``step`` call (from 0) runs at ``lr_scheduler(k)``, as TRL steps its scheduler once per
    ``step``. It sets the optimizer's injected ``learning_rate`` (the default optimizer has
    one; wrap a custom one in ``optax.inject_hyperparams``).

    TRL attributes: ``config``, ``model``, ``ref_model``, ``tokenizer``, ``optimizer``,
    ``lr_scheduler``, ``kl_ctl`` (its ``.value`` is the state's coefficient; setting it is
    used by the next step), ``dataset``, ``dataloader``, ``current_step``.
    """

    def __init__(
        self,
        config: Optional[PPOConfig] = None,
        model: Any = None,
        ref_model: Any = None,
        tokenizer: Any = None,
        dataset: Any = None,
        optimizer: Any = None,
        data_collator: Optional[Callable] = None,
        num_shared_layers: Optional[int] = None,
        lr_scheduler: Optional[Callable[[int], Any]] = None,
        mesh: Any = None,
    ):
        self.config = config = config if config is not None else PPOConfig()
        if model is None:
            raise ValueError("PPOTrainer needs a model: AutoModelForCausalLMWithValueHead.from_pretrained(...).")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise ValueError(
                f"lr_scheduler must be an optax schedule (a callable step -> learning rate, e.g. "
                f"optax.exponential_decay(1e-5, 1, 0.9)), got {type(lr_scheduler).__name__}."
            )
        self.model = _as_model_object(model)
        self.module = self.model.module
        self.tokenizer = tokenizer
        config.world_size = jax.process_count()
        config.global_backward_batch_size = config.backward_batch_size * config.world_size
        config.global_batch_size = config.batch_size * config.world_size
        config.is_encoder_decoder = bool(getattr(self.module, "is_encoder_decoder", False))
        config.is_peft_model = is_peft_module(self.module)
        self.is_encoder_decoder = config.is_encoder_decoder
        # PEFT without a ref_model (TRL's optional_peft_ctx): the reference is the policy with its
        # adapters disabled, on the policy's own params (state.ref_params is None: no copy).
        peft_ref = config.is_peft_model and ref_model is None
        if self.is_encoder_decoder:
            used = [name for name, given in (
                ("mesh=", mesh is not None),
                ("num_shared_layers", num_shared_layers is not None and ref_model is None),  # else ignored (warned)
                ("a PEFT policy without ref_model", peft_ref),
            ) if given]
            if used:
                raise ValueError(f"Encoder-decoder PPO runs without mesh=, num_shared_layers and PEFT; got "
                                 f"{', '.join(used)}. Drop them (a PEFT T5 policy needs an explicit ref_model).")
        # accelerator_kwargs={"mixed_precision": "bf16"} (accelerate's autocast): every forward pass
        # (generation, rollout, PPO step) computes in bfloat16 on float32 params; self.module stays
        # the float32 model that is saved.
        self.mixed_precision = config.accelerator_kwargs.get("mixed_precision", "no")
        self._compute = module_in_dtype(self.module, jnp.bfloat16) if self.mixed_precision == "bf16" else self.module
        self._ref_module = with_adapters_enabled(self._compute, False) if peft_ref else None

        # The jitted step donates the state: train on copies so the caller's arrays stay valid.
        policy = self.model.params
        # PEFT: only the adapters (+ value head) train, so the frozen base may be quantized.
        _check_float_params("model", policy, trainable_mask(policy, getattr(self.model, "lora_config", None))
                            if peft_ref else None)
        params = _copy_tree(policy)
        shared: Optional[int] = None
        if peft_ref:
            self.ref_model, ref_full = None, None  # TRL: ref_model is None for a PEFT policy
        elif ref_model is None:
            shared = num_shared_layers
            if shared is not None:
                shared_layer_mask(policy, shared)  # validates k against the model's layers
            self.ref_model = _with_params(self.model, policy)  # re-pointed at the state below
            _set_attr(self.ref_model, "num_shared_layers", shared)
            ref_full = None
        else:
            if num_shared_layers is not None:
                warnings.warn(
                    "num_shared_layers is ignored when a ref_model is provided: the given reference is used as it is "
                    "(to share layers, pass ref_model=create_reference_model(model, num_shared_layers=k)).",
                    UserWarning,
                )
            ref_obj = _as_model_object(ref_model)
            if ref_obj is self.model:  # the same object cannot hold the policy and the frozen reference
                ref_obj = _with_params(ref_obj, ref_obj.params)
            if type(ref_obj.module) is not type(self.module):
                raise ValueError("ref_model must be the same architecture as model (a value-head model of the same family).")
            ref_full = ref_obj.params
            _check_same_params("ref_model", ref_full, policy)
            k = getattr(ref_obj, "num_shared_layers", None)
            if k is not None and _shares_layers(policy, ref_full, k):
                shared = k  # create_reference_model(model, num_shared_layers=k) of this very model
            self.ref_model = ref_obj
        if peft_ref:  # adapters (+ value head, modules_to_save) train; the base stays frozen
            ref_params = None
            trainable = trainable_mask(params, getattr(self.model, "lora_config", None))
        elif shared is not None:
            mask = flatten_dict(shared_layer_mask(policy, shared))
            source = flatten_dict(policy if ref_full is None else ref_full)
            ref_params = _copy_tree(unflatten_dict({p: v for p, v in source.items() if not mask[p]}))
            trainable = jax.tree_util.tree_map(lambda s: not s, shared_layer_mask(params, shared))
        else:
            ref_params = params if ref_full is None else ref_full
            ref_params = _copy_tree(ref_params)
            trainable = None
        self.num_shared_layers = shared
        trainable_key = None if trainable is None else tuple(bool(t) for t in jax.tree_util.tree_leaves(trainable))
        if optimizer is None:
            self.optimizer = make_ppo_optimizer(config, trainable)
            tx = self.optimizer
            # equal settings give an equal optimizer: trainers share one jitted step (one compile)
            self._tx_key = ("default", float(config.learning_rate), config.max_grad_norm, trainable_key)
        elif peft_ref:  # no optimizer state (and no update) for the frozen base, whatever the optimizer
            self.optimizer = optimizer
            labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
            tx = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
            self._tx_key = ("user", optimizer, trainable_key)
        else:
            self.optimizer = optimizer
            tx = optimizer if trainable is None else freeze_params(optimizer, trainable)
            self._tx_key = ("user", optimizer, trainable_key)
        self._trainable = trainable if peft_ref else None  # the step differentiates these leaves only
        self._tx = tx  # the step closes over it (make_ppo_step(..., tx=tx)); the state holds opt_state
        self.lr_scheduler = lr_scheduler
        self.state = PPOTrainState.create(params, ref_params, config, tx=tx)
        if not has_learning_rate(self.state.opt_state):
            if lr_scheduler is not None:
                raise ValueError(
                    "lr_scheduler needs an optimizer whose learning rate is a hyperparameter: pass "
                    "optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=...), or put the schedule inside "
                    "your optimizer and drop lr_scheduler."
                )
            warnings.warn(
                "ppo/learning_rate will be NaN: this optimizer does not expose its learning rate. Build it with "
                "optax.inject_hyperparams (e.g. optax.inject_hyperparams(optax.adam)(learning_rate=1e-5)) to log it.",
                UserWarning,
            )
        if config.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
        else:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        self.kl_ctl.state = self.state.kl
        self.mesh = mesh
        if mesh is None:  # equal settings share one jitted function (and its compiled programs)
            shared_ref = self.num_shared_layers is not None
            self._forward = _cached_jit(
                ("forward", self._compute, config.kl_penalty, config.mini_batch_size, shared_ref, self._ref_module),
                lambda: jax.jit(self._forward_fn()),
            )
            self._ppo_step = _cached_jit(
                ("ppo_step", self._compute, _config_key(config), self._tx_key),
                lambda: jax.jit(make_ppo_step(self._compute, config, tx=tx, trainable=self._trainable),
                                donate_argnums=(0,)),
            )
        else:
            self._jit_on_mesh(mesh)
        self.dataset = dataset
        self.data_collator = data_collator
        if dataset is None:
            warnings.warn(
                "No dataset is provided. Make sure to set config.batch_size to the correct value before training.",
                UserWarning,
            )
            self.dataloader = None
        else:
            self.dataloader = self.prepare_dataloader(dataset, data_collator)
        self.current_step = 0
        self.log_history: List[Dict[str, Any]] = []
        self._logger = None
        self._gen_rng = jax.random.PRNGKey(config.seed + 1)
        self._publish()

    # -- helpers ----------------------------------------------------------------------------
    def _forward_fn(self):
        # TRL's batched_forward_pass: mini_batch_size rows at a time (bounded memory).
        forward = make_forward_rollout(self._compute, self.config.kl_penalty, ref_module=self._ref_module,
                                       chunk_size=self.config.mini_batch_size)
        shared = self.num_shared_layers is not None

        def fn(params, ref_params, queries, qmask, responses, rmask):
            ref = merge_reference(params, ref_params) if shared else ref_params
            return forward(params, ref, queries, qmask, responses, rmask)

        return fn

    def _encoder_decoder_fns(self, query_length: int):
        """(forward, ppo_step) for an encoder-decoder policy and queries padded to ``query_length``:
        ``rljax.models.seq2seq``'s TRL encoder-decoder forward and the shared PPO step over a
        ``Seq2SeqAsCausal`` view (one compiled pair per query-length bucket)."""
        from rljax.models.seq2seq import make_seq2seq_forward_rollout

        c = self.config
        view, forward = make_seq2seq_forward_rollout(self._compute, query_length, c.kl_penalty, c.mini_batch_size)
        fwd = _cached_jit(("s2s_forward", view, c.kl_penalty, c.mini_batch_size), lambda: jax.jit(forward))
        step = _cached_jit(("s2s_ppo_step", view, _config_key(c), self._tx_key),
                           lambda: jax.jit(make_ppo_step(view, c, tx=self._tx), donate_argnums=(0,)))
        return fwd, step

    def _jit_on_mesh(self, mesh) -> None:
        """Shard the state by the family's rules (params, reference, Adam moments) and jit the
        forward pass and ``ppo_step`` with batch-sharded rollouts (rows on data x fsdp)."""
        from rljax.sharding import batch_sharding, jit_sharded, replicated
        from rljax.trainers.base import shard_state_for_mesh

        self.state, sh = shard_state_for_mesh(self.state, mesh, self.config.mini_batch_size,
                                              f"mini_batch_size={self.config.mini_batch_size}")
        rows = batch_sharding(mesh)
        self._forward = jit_sharded(
            self._forward_fn(), mesh, in_shardings=(sh.params, sh.ref_params, rows, rows, rows, rows), out_shardings=rows
        )
        self._ppo_step = jit_sharded(
            make_ppo_step(self._compute, self.config, tx=self._tx, trainable=self._trainable), mesh,
            in_shardings=(sh, rows, rows),
            out_shardings=(sh, replicated(mesh)), donate_argnums=(0,),
        )

    def _ref_full_params(self) -> Any:
        if self.num_shared_layers is None:
            return self.state.ref_params
        return merge_reference(self.state.params, self.state.ref_params)

    def _publish(self) -> None:
        """Point ``model.params``, ``ref_model.params`` and ``kl_ctl`` at the current state (TRL
        updates them in place). Done after every step: the step donates the old arrays."""
        _set_attr(self.model, "params", self.state.params)
        if self.ref_model is not None:
            _set_attr(self.ref_model, "params", self._ref_full_params())
        self.kl_ctl.state = self.state.kl

    def _sync_before_step(self) -> None:
        """Feed host-side changes into the state: a ``kl_ctl.value`` set by the user, and the
        scheduled learning rate of this step."""
        if self.kl_ctl.state is not self.state.kl:
            self.state = self.state.replace(kl=self.kl_ctl.state)
        if self.lr_scheduler is not None:
            lr = float(self.lr_scheduler(self.current_step))
            self.state = self.state.replace(opt_state=set_learning_rate(self.state.opt_state, lr))

    @property
    def params(self):
        return self.state.params

    @property
    def kl_ctl_value(self) -> float:
        return self.kl_ctl.value

    def prepare_dataloader(self, dataset: Any, data_collator: Optional[Callable] = None) -> PPODataLoader:
        """Shuffled batches of ``config.batch_size`` (drop_last, as TRL), a fresh epoch per
        iteration. A ``datasets.Dataset`` loses the columns TRL removes
        (``config.remove_unused_columns``): all but input_ids, attention_mask, label, query, response."""
        names = getattr(dataset, "column_names", None)
        if self.config.remove_unused_columns and isinstance(names, list) and hasattr(dataset, "remove_columns"):
            unused = [c for c in names if c not in _SIGNATURE_COLUMNS]
            if unused:
                dataset = dataset.remove_columns(unused)
        return PPODataLoader(dataset, self.config.batch_size, data_collator, seed=self.config.seed)

    def _pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return 0

    # -- TRL's building blocks, on host arrays (for scripts and tests; step() fuses them) ---
    def prepare_model_inputs(self, queries: Sequence[Any], responses: Sequence[Any]) -> Dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` [batch, max_len] of ``query + response``, padded
        on the tokenizer's ``padding_side`` (default right) with its pad id, as TRL's collator."""
        seqs = [np.concatenate([_to_numpy(q), _to_numpy(r)]).astype(np.int32) for q, r in zip(queries, responses)]
        side = getattr(self.tokenizer, "padding_side", "right") or "right"
        L = max(len(x) for x in seqs)
        return {
            "input_ids": pad_sequences(seqs, self._pad_token_id(), side, L),
            "attention_mask": pad_sequences([np.ones(len(x), np.int32) for x in seqs], 0, side, L),
        }

    def batched_forward_pass(
        self,
        model: Any,
        queries: Sequence[Any],
        responses: Sequence[Any],
        model_inputs: Dict[str, Any],
        return_logits: bool = False,
        response_masks: Optional[Sequence[Any]] = None,
    ):
        """TRL's forward pass in eval mode, ``mini_batch_size`` rows at a time, on
        ``prepare_model_inputs``' layout. ``model``: e.g. ``trainer.model`` / ``trainer.ref_model``.

        Returns ``(logprobs [B, L-1], logits [B, L-1, V] or None, values [B, L-1], masks [B, L-1])``:
        position ``t`` scores token ``t+1``; ``masks`` is 1 on each row's response tokens
        (times ``response_masks``).
        """
        module, params = _unpack(model)
        if self.mixed_precision == "bf16":  # under accelerate's autocast in TRL
            module = module_in_dtype(module, jnp.bfloat16)
        fwd = self._eval_forward(module)
        ids = np.asarray(model_inputs["input_ids"])
        am = np.asarray(model_inputs["attention_mask"])
        L = ids.shape[1]
        # Extra right padding to a bucketed length (few compiled shapes) cannot change the
        # outputs at the first L positions of a causal model; it is cut off again below.
        W = bucket_length(L, 8)
        ids_w = np.pad(ids, ((0, 0), (0, W - L)), constant_values=self._pad_token_id())
        am_w = np.pad(am, ((0, 0), (0, W - L)))
        fbs = self.config.mini_batch_size
        chunks = [fwd(params, ids_w[i : i + fbs], am_w[i : i + fbs]) for i in range(0, len(ids), fbs)]
        logprobs, logits, values = (jnp.concatenate(parts)[:, : L - 1] for parts in zip(*chunks))
        # Response positions: token t+1 is a response token (left padding offsets the start).
        qlen = np.array([len(q) for q in queries])
        rlen = np.array([len(r) for r in responses])
        start = qlen - 1 + np.where(am[:, 0] == 0, np.argmax(am > 0, axis=1), 0)
        pos = np.arange(ids.shape[1] - 1)[None, :]
        inside = (pos >= start[:, None]) & (pos < (start + rlen)[:, None])
        masks = (am[:, 1:] * inside).astype(np.int32)
        if response_masks is not None:
            extra = np.zeros_like(masks)
            for j, m in enumerate(response_masks):  # host-side helper, one row at a time is fine
                m = _to_numpy(m).astype(np.int32)
                extra[j, start[j] : start[j] + len(m)] = m[: max(0, masks.shape[1] - start[j])]
            masks = masks * extra
        return logprobs, (logits if return_logits else None), values, jnp.asarray(masks)

    def _eval_forward(self, module: Any) -> Callable:
        """Jitted ``(params, ids, mask) -> (logprobs, logits, values)``, each shifted to [B, W-1]."""

        def build():
            def fwd(params, ids, am):
                out = module.apply({"params": params}, ids, am, deterministic=True)
                logits = out.logits[:, :-1]
                return logprobs_from_logits(logits, ids[:, 1:]), logits, out.values[:, :-1].astype(jnp.float32)

            return jax.jit(fwd)

        return _cached_jit(("eval_forward", module), build)

    def compute_rewards(self, scores: Any, logprobs: Any, ref_logprobs: Any, masks: Any):
        """TRL's per-token rewards at the current ``kl_ctl.value`` (``rljax.ppo.compute_rewards``).
        Returns (rewards, non_score_rewards, kls), each [B, T]."""
        scores = jnp.asarray(_to_numpy(scores), jnp.float32).reshape(-1)
        return _compute_rewards_jit(scores, logprobs, ref_logprobs, masks, self.kl_ctl.value, self.config.kl_penalty)

    def compute_advantages(self, values: Any, rewards: Any, mask: Any):
        """TRL's GAE + whitening (``rljax.ppo.compute_advantages``): (values, advantages, returns).
        Raises ValueError when ``mask`` has fewer than 2 tokens (whitening is undefined)."""
        check_whiten_mask(np.asarray(mask))
        c = self.config
        return _compute_advantages_jit(values, rewards, mask, c.gamma, c.lam, whiten_rewards=c.whiten_rewards)

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        """TRL's ``loss``: ``(pg_loss, vf_coef * vf_loss, stats)`` (``rljax.losses.ppo_loss``);
        warns, as TRL, when the batch is skipped by ``ratio_threshold``."""
        c = self.config
        args = [jnp.asarray(_to_numpy(x)) for x in (old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns)]
        pg_loss, vf_loss, stats = _ppo_loss_jit(
            *args, cliprange=c.cliprange, cliprange_value=c.cliprange_value, vf_coef=c.vf_coef,
            ratio_threshold=c.ratio_threshold,
        )
        if float(stats["skipped"]) > 0:
            warnings.warn(f"The average ratio of batch exceeds threshold {c.ratio_threshold:.2f}. Skipping batch.")
        return pg_loss, vf_loss, stats

    def _kl_penalty(self, logprob: Any, ref_logprob: Any):
        """TRL's per-token KL penalty of ``config.kl_penalty`` (``rljax.ppo.kl_penalty``)."""
        return kl_penalty(jnp.asarray(_to_numpy(logprob)), jnp.asarray(_to_numpy(ref_logprob)), self.config.kl_penalty)

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        query_tensor: Union[Any, List[Any]],
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        remove_padding: bool = True,
        rng: Optional[jax.Array] = None,
        **generation_kwargs: Any,
    ):
        """Sample responses for one query (1-D) or a list of queries (batched, ``batch_size`` at a time).

        ``generation_kwargs`` take HF names: max_new_tokens, do_sample, top_k, top_p,
        temperature, min_length (-1 = off), min_new_tokens, eos_token_id, pad_token_id.
        Returns a list of 1-D arrays (query + response when ``return_prompt``), or for a single
        query one [1, length] array (as TRL); with ``generate_ref_response`` a second one from the
        reference model. Generation stops at ``eos_token_id`` (default: the model config's, as
        HF ``generate``); ``remove_padding`` cuts each response after its first eos.
        """
        from rljax.generation import generate as _generate
        from rljax.generation import strip_responses

        single = not isinstance(query_tensor, (list, tuple))
        queries = [np.asarray(query_tensor)] if single else [np.asarray(q) for q in query_tensor]
        if any(q.ndim != 1 or q.size == 0 for q in queries):
            raise ValueError("Each query must be a non-empty 1-D array of token ids.")
        kw = _hf_generation_kwargs(generation_kwargs, self._pad_token_id(), sampled_length=length_sampler is not None)
        if "eos_token_id" not in kw:  # HF generate's default: the model config's eos (else the tokenizer's)
            eos = getattr(self.module.config, "eos_token_id", None)
            if eos is None and self.tokenizer is not None:
                eos = self.tokenizer.eos_token_id
            kw["eos_token_id"] = eos
        if rng is None:
            self._gen_rng, rng = jax.random.split(self._gen_rng)
        policy_params = self.state.params
        ref_full = merge_reference(policy_params, self.state.ref_params) if self.num_shared_layers is not None else self.state.ref_params
        outs, ref_outs = [], []
        limit, width = None, None
        if length_sampler is not None:
            # One compiled program for every sampled length: generate at the sampler's maximum
            # width with the sampled length as a traced limit, then cut the columns past it.
            # (A bare callable with no known maximum: each new length is a new static width.)
            width = _length_sampler_max(length_sampler)
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            if length_sampler is not None:
                limit = int(length_sampler())
                if width is None:
                    kw["max_new_tokens"], limit = limit, None
                elif not 1 <= limit <= width:
                    raise ValueError(f"length_sampler returned {limit}; it must be between 1 and its maximum {width}.")
                else:
                    kw["max_new_tokens"] = width
            P = bucket_length(max(len(q) for q in chunk), 8)
            rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # static batch shape
            ids = pad_sequences(rows, kw["pad_token_id"], "left", P)
            mask = pad_sequences([np.ones(len(q), np.int32) for q in rows], 0, "left", P)
            rng, k1, k2 = jax.random.split(rng, 3)
            # PEFT without a ref_model: the reference is the policy's own params with adapters off.
            ref_gen = (self._compute, ref_full) if self._ref_module is None else (self._ref_module, policy_params)
            runs = (((self._compute, policy_params), outs, k1),) + ((ref_gen, ref_outs, k2),) * bool(generate_ref_response)
            for (module, params), sink, key in runs:
                if self.is_encoder_decoder:  # TRL returns the decoder output, start token included
                    self._append_decoder_outputs(params, ids, mask, key, kw, sink, len(chunk), remove_padding, limit)
                    continue
                gen = _generate(module, params, ids, mask, key, new_tokens_limit=limit, **kw)
                seqs = np.asarray(gen.sequences)[: len(chunk)]
                if limit is not None:
                    seqs = seqs[:, : P + limit]  # as if generated with max_new_tokens=limit
                resp = strip_responses(seqs, P, kw.get("eos_token_id"), kw["pad_token_id"], remove_padding=remove_padding)
                for q, r in zip(chunk, resp):
                    sink.append(np.concatenate([q, r]) if return_prompt else r)
        if single:  # TRL returns model.generate's [1, length] tensor for a single query
            outs, ref_outs = outs[0][None, :], (ref_outs[0][None, :] if ref_outs else None)
        return (outs, ref_outs) if generate_ref_response else outs

    def _append_decoder_outputs(self, params, ids, mask, key, kw, sink, n, remove_padding, limit=None) -> None:
        """Encoder-decoder generation for one chunk: each row's decoder tokens (start token first),
        cut after the first eos when ``remove_padding`` (TRL), else up to the longest row."""
        from rljax.models.seq2seq import seq2seq_generate

        kw = {k: v for k, v in kw.items() if k not in ("new_tokens_limit",)}
        if limit is not None:  # a LengthSampler draw: one program per drawn length here
            kw["max_new_tokens"] = int(limit)
        gen = seq2seq_generate(self._compute, params, ids, mask, key, **kw)
        seqs = np.asarray(gen.sequences)[:n]
        width = int(np.asarray(gen.response_mask)[:n].sum(-1).max())  # HF stops when every row is done
        eos = kw.get("eos_token_id")
        eos = [] if eos is None else [int(e) for e in np.atleast_1d(eos)]
        for row in seqs[:, :width]:
            hits = np.nonzero(np.isin(row[1:], eos))[0] if eos else []
            sink.append(row[: hits[0] + 2] if remove_padding and len(hits) else row)

    # -- the step ---------------------------------------------------------------------------
    def _check_token_ids(self, queries: List[np.ndarray], responses: List[np.ndarray]) -> None:
        """Host checks that stop wrong token ids from training silently: integer dtype, ids in
        ``[0, vocab_size)`` (``-100`` is the labels' ignore index, not a token) and query +
        response within the model's positions (past them the position embedding is garbage/NaN)."""
        cfg = getattr(self.module, "config", None)
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        for name, xs in (("queries", queries), ("responses", responses)):
            for i, x in enumerate(xs):
                if not np.issubdtype(x.dtype, np.integer):
                    raise ValueError(
                        f"query/response token ids must be integers: {name}[{i}] has dtype {x.dtype}. Pass the "
                        "tokenizer's ids (e.g. np.asarray(ids, np.int32)); floats would be truncated to other tokens."
                    )
                check_token_range(self.module, x, f"{name}[{i}]",
                                  "strip -100 (or pass response_masks) and use the policy's own tokenizer.")
        if positions:
            for i, (q, r) in enumerate(zip(queries, responses)):
                if len(q) + len(r) > positions:
                    raise ValueError(
                        f"queries[{i}] ({len(q)} tokens) + responses[{i}] ({len(r)} tokens) = {len(q) + len(r)} exceeds "
                        f"the model's max_position_embeddings {positions}; truncate the query (tokenizer(..., "
                        "truncation=True, max_length=...)) or generate fewer tokens."
                    )

    def _step_safety_checker(
        self,
        batch_size: Optional[int],
        queries: Sequence[Any],
        responses: Sequence[Any],
        scores: Any,
        masks: Optional[Sequence[Any]] = None,
    ):
        """TRL's input checks, before anything touches the state: queries/responses lists of
        ``batch_size`` non-empty 1-D token arrays (numpy, jax or torch), scores ``batch_size``
        scalars (0-d / one-element arrays or numbers, or one 1-D array; finite), masks like
        the responses. Returns ``(queries, responses, scores, masks)``: lists of numpy arrays
        and float32 scalars. Raises ValueError naming the argument."""
        for name, xs in (("queries", queries), ("responses", responses)):
            if not isinstance(xs, (list, tuple)):
                raise ValueError(f"{name} must be a list of 1-D token arrays - got {type(xs).__name__}")
            if batch_size is not None and len(xs) != batch_size:
                raise ValueError(f"Batch size ({batch_size}) does not match number of examples - but got {len(xs)} for: {name}")
            for i, x in enumerate(xs):
                if not hasattr(x, "shape"):
                    raise ValueError(f"Elements in {name} must be arrays - got {type(x).__name__} at {name}[{i}]")
                if len(x.shape) != 1 or x.shape[0] == 0:
                    raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)}; every entry must be a non-empty 1-D token array.")
        n = batch_size if batch_size is not None else len(queries)
        if isinstance(scores, (list, tuple)):
            for i, s in enumerate(scores):
                if np.ndim(_to_numpy(s)) > 1:
                    raise ValueError(f"Scores must be 1-dimensional - got {np.ndim(_to_numpy(s))} for scores[{i}]")
        scores = [np.float32(s) for s in validate_scores(scores, n)]
        queries = [_to_numpy(q) for q in queries]
        responses = [_to_numpy(r) for r in responses]
        self._check_token_ids(queries, responses)
        if masks is not None:
            if len(masks) != n:
                raise ValueError(f"response_masks has {len(masks)} entries, expected {n}.")
            masks = [_to_numpy(m) for m in masks]
            for i, (m, r) in enumerate(zip(masks, responses)):
                if m.shape != r.shape:
                    raise ValueError(f"response_masks[{i}] has shape {m.shape}, its response {r.shape}.")
        return queries, responses, scores, masks

    def step(self, queries: Sequence[Any], responses: Sequence[Any], scores: Sequence[Any], response_masks=None) -> Dict[str, Any]:
        """One PPO iteration on ``batch_size`` (query, response, score) triples.

        queries/responses: lists of 1-D token arrays; scores: list of scalars or a [batch] array.
        ``response_masks``: optional per-response 0/1 masks (tokens to leave out of the loss).
        Returns TRL's stats dict (numpy arrays and floats) incl. ``time/ppo/*``; the per-token
        ``ppo/policy/advantages`` and ``ppo/policy/ratio`` leave out epochs skipped by early
        stopping, as TRL. Afterwards ``model.params`` / ``ref_model.params`` / ``kl_ctl.value``
        are the new state's.
        """
        t0 = time.time()
        queries, responses, scores, response_masks = self._step_safety_checker(
            self.config.batch_size, queries, responses, scores, response_masks
        )
        pad = self._pad_token_id()
        P = bucket_length(max(len(q) for q in queries), 8)
        N = bucket_length(max(len(r) for r in responses), 8)
        q = pad_sequences(queries, pad, "left", P)
        qm = pad_sequences([np.ones(len(x), np.int32) for x in queries], 0, "left", P)
        r = pad_sequences(responses, pad, "right", N)
        rm = pad_sequences([np.ones(len(x), np.int32) for x in responses], 0, "right", N)
        extra = None
        if response_masks is not None:
            extra = pad_sequences([np.asarray(m) for m in response_masks], 0, "right", N).astype(np.float32)
        forward, ppo_step = self._forward, self._ppo_step
        if self.is_encoder_decoder:  # queries -> encoder, responses (start token first) -> decoder
            from rljax.models.seq2seq import response_aligned_masks

            forward, ppo_step = self._encoder_decoder_fns(P)
            masks = np.asarray(response_aligned_masks(jnp.asarray(rm), None if extra is None else jnp.asarray(extra)))
            check_whiten_mask(masks)
        else:
            # Advantages are whitened over all response tokens of the batch: that needs at least 2.
            check_whiten_mask(rm if extra is None else rm * extra)
        self._sync_before_step()
        t = time.time()
        rollout = forward(self.state.params, self.state.ref_params, q, qm, r, rm)
        if self.is_encoder_decoder:
            rollout = rollout.replace(masks=jnp.asarray(masks))
        elif extra is not None:  # the rollout's [B, N] arrays are aligned with the responses
            rollout = rollout.replace(masks=rollout.masks * extra)
        jax.block_until_ready(rollout.logprobs)
        t_forward = time.time() - t
        t = time.time()
        self.state, stats = ppo_step(self.state, rollout, jnp.asarray(np.asarray(scores, np.float32)))
        self._publish()
        jax.block_until_ready(stats)
        t_opt = time.time() - t
        t = time.time()
        stats = stats_to_np(jax.device_get(stats))
        stats = convert_to_scalar(drop_skipped_epochs(stats, self.config.ppo_epochs))
        t_stats = time.time() - t
        if stats["objective/kl"] < -1.0:
            warnings.warn(
                f"KL divergence is starting to become negative: {stats['objective/kl']:.2f} - this might be a precursor "
                "for failed training. sometimes this happens because the generation kwargs are not correctly set. "
                "Please make sure that the generation kwargs are set correctly, or review your training hyperparameters."
            )
        if stats.get("ppo/minibatches_skipped", 0) > 0:
            warnings.warn(
                f"{int(stats['ppo/minibatches_skipped'])} minibatch(es) had an average ratio above "
                f"ratio_threshold={self.config.ratio_threshold} and were skipped (params and optimizer untouched)."
            )
        if stats.get("ppo/skipped_nonfinite_scores", 0) > 0:  # unreachable through step(): validate_scores raised
            warnings.warn("Non-finite scores: the batch was skipped.")
        stats["time/ppo/forward_pass"] = t_forward
        # Rewards and advantages are fused into the one jitted optimisation step: their time is
        # inside optimize_step (the keys stay, so TRL dashboards keep working).
        stats["time/ppo/compute_rewards"] = 0.0
        stats["time/ppo/compute_advantages"] = 0.0
        stats["time/ppo/optimize_step"] = t_opt
        stats["time/ppo/calc_stats"] = t_stats
        stats["time/ppo/total"] = time.time() - t0
        self.current_step += 1
        return stats

    def log_stats(self, stats: Dict[str, Any], batch: Dict[str, Any], rewards: Any, columns_to_log: Sequence[str] = ("query", "response")) -> Dict[str, Any]:
        """Add ``env/reward_mean``, ``env/reward_std`` (unbiased), ``env/reward_dist`` and record the stats."""
        rewards = np.asarray([float(np.asarray(x)) for x in rewards], np.float64)
        logs = {k: v for k, v in stats.items() if not isinstance(v, np.ndarray) or v.size == 1}
        logs["env/reward_mean"] = float(rewards.mean())
        logs["env/reward_std"] = float(rewards.std(ddof=1)) if rewards.size > 1 else 0.0
        logs["env/reward_dist"] = rewards
        logs["step"] = self.current_step
        self.log_history.append(logs)
        if self.config.log_with is not None:  # TRL's trackers: tensorboard / wandb (/ jsonl)
            logger = self._metric_logger()
            logger.log({**logs, "env/reward_dist": rewards}, self.current_step)
            if all(c in batch for c in columns_to_log):
                rows = [dict(zip(columns_to_log, vals), reward=float(r)) for *vals, r in zip(*(batch[c] for c in columns_to_log), rewards)]
                logger.log_samples(rows, self.current_step)
        return logs

    def _metric_logger(self):
        if self._logger is None:
            from rljax.logging import MetricLogger

            c = self.config
            logdir = c.project_kwargs.get("logging_dir") or os.path.join("runs", c.exp_name or "ppo")
            self._logger = MetricLogger(
                [c.log_with], logdir, config=c.to_dict(), project_name=c.tracker_project_name,
                tracker_kwargs=c.tracker_kwargs,
            )
        return self._logger

    def save_pretrained(self, path: str, *, overwrite: bool = False) -> None:
        """Save the policy (with value head) in HF format; a PEFT policy saves as TRL's does: the
        adapter in PEFT's files plus the value head (``model.safetensors``)."""
        from rljax.models.heads import save_value_head_model

        if self.config.is_peft_model:
            from rljax.models.peft import LoraConfig, PeftModel

            lora = getattr(self.model, "lora_config", None) or LoraConfig()
            PeftModel(self.module, self.state.params, lora, base_model=self.model).save_pretrained(path)
            return
        save_value_head_model(self.module, self.state.params, path, overwrite=overwrite)


# ==========================================================================
# Host-side helpers
# ==========================================================================


def _check_float_params(name: str, params: Any, trainable: Any = None) -> None:
    """PPO trains params by gradient: integer (e.g. quantized) leaves cannot be trained.
    ``trainable`` (bool pytree, PEFT): only those leaves are checked (a frozen base may be quantized)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keep = [True] * len(leaves) if trainable is None else jax.tree_util.tree_leaves(trainable)
    bad = [(jax.tree_util.keystr(p), jnp.result_type(x)) for (p, x), k in zip(leaves, keep)
           if k and not jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if bad:
        raise ValueError(
            f"{name}'s params must be floating point to train; {len(bad)} leaves are not (first: {bad[0][0]} has dtype "
            f"{bad[0][1]}). Load the model in float32 or bfloat16 (torch_dtype=...), or quantize only a frozen base "
            "under LoRA (peft_config=...)."
        )


def _check_same_params(name: str, params: Any, policy: Any) -> None:
    """The reference must have the policy's parameter tree and shapes (same architecture and config)."""
    flat, ref_flat = flatten_dict(policy), flatten_dict(params)
    missing = sorted(set(flat) - set(ref_flat))
    extra = sorted(set(ref_flat) - set(flat))
    shapes = [(k, ref_flat[k].shape, flat[k].shape) for k in flat if k in ref_flat and ref_flat[k].shape != flat[k].shape]
    if missing or extra or shapes:
        what = (f"missing {'/'.join(missing[0])}" if missing else f"unexpected {'/'.join(extra[0])}" if extra
                else f"{'/'.join(shapes[0][0])} has shape {shapes[0][1]}, the policy's {shapes[0][2]}")
        raise ValueError(
            f"{name} does not match the policy's parameters ({what}): the reference must be the same architecture and "
            "config as model. Use create_reference_model(model) or load the same checkpoint twice."
        )


def _copy_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


_compute_rewards_jit = jax.jit(compute_rewards, static_argnames=("kl_penalty",))
_compute_advantages_jit = jax.jit(compute_advantages, static_argnames=("whiten_rewards",))
_ppo_loss_jit = jax.jit(ppo_loss)

_JIT_CACHE: "OrderedDict[Any, Callable]" = OrderedDict()
_JIT_CACHE_SIZE = 16


def _cached_jit(key: Any, build: Callable[[], Callable]) -> Callable:
    """The jitted function for ``key`` (built once; the last ``_JIT_CACHE_SIZE`` kept), so
    trainers with equal modules and configs reuse compiled programs. Unhashable keys build anew."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key in _JIT_CACHE:
        _JIT_CACHE.move_to_end(key)
        return _JIT_CACHE[key]
    fn = _JIT_CACHE[key] = build()
    if len(_JIT_CACHE) > _JIT_CACHE_SIZE:
        _JIT_CACHE.popitem(last=False)
    return fn


# The PPOConfig fields make_ppo_step reads (the rest: logging, the optimizer, the KL controller state).
_STEP_FIELDS = (
    "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "cliprange", "cliprange_value",
    "vf_coef", "ratio_threshold", "early_stopping", "target_kl", "use_score_scaling", "use_score_norm",
    "score_clip", "kl_penalty", "gamma", "lam", "whiten_rewards",
)


def _config_key(config: PPOConfig) -> Tuple[Any, ...]:
    """What ``make_ppo_step`` reads from ``config``, as one hashable value."""
    return tuple((name, getattr(config, name)) for name in _STEP_FIELDS)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (TRL users)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _unpack(model: Any):
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if hasattr(model, "module") and hasattr(model, "params"):
        return model.module, model.params
    raise ValueError("model must be an AutoModelForCausalLMWithValueHead (with .module/.params) or a (module, params) pair.")


def _as_model_object(model: Any) -> Any:
    """``model`` itself when it has ``.module``/``.params``; a ``(module, params)`` pair becomes an
    ``AutoModelForCausalLMWithValueHead`` (so the trainer can publish trained params on it)."""
    module, params = _unpack(model)
    if isinstance(model, tuple):
        from rljax.models.heads import AutoModelForCausalLMWithValueHead

        return AutoModelForCausalLMWithValueHead(module, params)
    return model


def _with_params(model: Any, params: Any) -> Any:
    """A shallow copy of the model object holding ``params`` (same kind as ``model``)."""
    other = copy.copy(model)
    try:
        other.params = params
    except AttributeError:  # a read-only params attribute: fall back to the plain wrapper
        from rljax.models.heads import AutoModelForCausalLMWithValueHead

        other = AutoModelForCausalLMWithValueHead(model.module, params)
    return other


def _set_attr(obj: Any, name: str, value: Any) -> None:
    try:
        setattr(obj, name, value)
    except AttributeError:
        warnings.warn(f"{type(obj).__name__}.{name} cannot be set; it does not follow the trainer's state.")


def _length_sampler_max(length_sampler: Callable[[], int]) -> Optional[int]:
    """The largest length ``length_sampler`` can return: ``rljax.core.LengthSampler``'s (and
    TRL's) ``values``, else a ``max_value`` attribute; None when unknown (a bare callable)."""
    values = getattr(length_sampler, "values", None)
    if values:
        return int(max(values))
    if getattr(length_sampler, "max_value", None) is not None:
        return int(length_sampler.max_value)
    return None


_GEN_KEYS = {"max_new_tokens", "do_sample", "top_k", "top_p", "temperature", "min_length", "min_new_tokens", "eos_token_id", "pad_token_id", "max_length"}


def _hf_generation_kwargs(kwargs: Dict[str, Any], default_pad: int, sampled_length: bool = False) -> Dict[str, Any]:
    unknown = sorted(set(kwargs) - _GEN_KEYS)
    if unknown:
        raise ValueError(f"Unsupported generation kwargs {unknown}; supported: {sorted(_GEN_KEYS)}.")
    kw = dict(kwargs)
    if "max_length" in kw:
        raise ValueError("Use max_new_tokens instead of max_length (static shapes need the number of new tokens).")
    if "max_new_tokens" not in kw and not sampled_length:
        raise ValueError("generation needs max_new_tokens (TRL examples use e.g. max_new_tokens=32).")
    min_length = kw.pop("min_length", -1)
    if min_length is not None and min_length > 0 and "min_new_tokens" not in kw:
        raise ValueError("min_length counts the prompt; pass min_new_tokens instead (min_length=-1 disables it).")
    kw["top_k"] = int(kw.get("top_k", 0) or 0)
    kw["top_p"] = float(kw.get("top_p", 1.0))
    kw.setdefault("do_sample", True)
    kw.setdefault("pad_token_id", default_pad)
    return kw
