"""TRL 0.7.11's ``PPOTrainer`` as a thin shell over ``rljax.ppo_train``.

The shell owns the host side only: padding lists of token arrays into static
shapes, validating inputs, batching generation, timing and logging. The math
is the pure functions in ``rljax.ppo`` / ``rljax.ppo_train``; the state is a
``PPOTrainState`` pytree at ``trainer.state``.

A TRL script ports by changing imports and turning tensors into arrays::

    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer, dataset=ds)
    for batch in trainer.dataloader:
        responses = trainer.generate(batch["input_ids"], return_prompt=False, **gen_kwargs)
        stats = trainer.step(batch["input_ids"], responses, scores)
        trainer.log_stats(stats, batch, scores)
"""
from __future__ import annotations

import os
import re
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.core import convert_to_scalar, stats_to_np
from rljax.data import BatchIterator, bucket_length, pad_sequences
from rljax.ppo import PPOConfig, validate_scores
from rljax.ppo_train import (
    PPOTrainState,
    make_forward_rollout,
    make_ppo_optimizer,
    make_ppo_step,
)

_LAYER = re.compile(r"(?:^|/)(?:h|layers)_(\d+)(?:/|$)")
_EMBED = re.compile(r"(?:^|/)(?:wte|wpe|embed_tokens)(?:/|$)")


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
    """A frozen reference for ``model`` (an object with ``.module``/``.params``, or params).

    Returns ``ref_params``. Without ``num_shared_layers`` it is a copy of all params. With
    ``num_shared_layers=k`` (deliberate fix: TRL 0.7.11 shares nothing in memory, it freezes the policy's first layers instead) the embeddings and first ``k``
    layers are really shared: they are left out of ``ref_params`` and read from the
    (frozen) policy params at reference time, so they cost no extra memory.
    """
    if pattern is not None:
        raise ValueError("Custom layer patterns are not needed in rljax: layers are found by name (h_i / layers_i).")
    params = model.params if hasattr(model, "params") else model
    copy = jax.tree_util.tree_map(jnp.array, params)
    if num_shared_layers is None:
        return copy
    mask = flatten_dict(shared_layer_mask(params, num_shared_layers))
    return unflatten_dict({p: v for p, v in flatten_dict(copy).items() if not mask[p]})


def merge_reference(params: Any, ref_params: Any) -> Any:
    """Full reference params: ``ref_params`` leaves, and the shared ones from ``params``."""
    flat_ref = flatten_dict(ref_params)
    return unflatten_dict({p: flat_ref.get(p, v) for p, v in flatten_dict(params).items()})


# ==========================================================================
# The shell
# ==========================================================================


class PPOTrainer:
    """``PPOTrainer(config, model, ref_model=None, tokenizer=None, dataset=None, ...)``.

    ``model``: an ``AutoModelForCausalLMWithValueHead`` (``.module``, ``.params``) or a
    ``(module, params)`` pair whose module returns ``.logits`` and ``.values``.
    ``ref_model``: the same kinds, or None for ``create_reference_model(model,
    num_shared_layers)``. ``optimizer``: an optax transformation (default: TRL's Adam).
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
        lr_scheduler: Any = None,
        mesh: Any = None,
    ):
        self.config = config = config if config is not None else PPOConfig()
        if model is None:
            raise ValueError("PPOTrainer needs a model: AutoModelForCausalLMWithValueHead.from_pretrained(...).")
        if lr_scheduler is not None:
            raise ValueError("Pass a schedule inside the optax optimizer (e.g. optax.adam(optax.linear_schedule(...))).")
        self.module, params = _unpack(model)
        # The jitted step donates the state: train on copies so the caller's arrays stay valid.
        params = _copy_tree(params)
        self.tokenizer = tokenizer
        if ref_model is not None and num_shared_layers is not None:
            warnings.warn("num_shared_layers is ignored when a ref_model is given (TRL behaviour).")
            num_shared_layers = None
        if ref_model is None:
            ref_params = create_reference_model(params, num_shared_layers)
            trainable = None
            if num_shared_layers is not None:
                trainable = jax.tree_util.tree_map(lambda s: not s, shared_layer_mask(params, num_shared_layers))
        else:
            ref_module, ref_params = _unpack(ref_model)
            ref_params = _copy_tree(ref_params)
            if type(ref_module) is not type(self.module):
                raise ValueError("ref_model must be the same architecture as model (a value-head model of the same family).")
            trainable = None
        self.num_shared_layers = num_shared_layers
        tx = optimizer if optimizer is not None else make_ppo_optimizer(config, trainable)
        self.state = PPOTrainState.create(params, ref_params, config, tx=tx)
        self.kl_ctl_value = float(config.init_kl_coef)
        self.mesh = mesh
        if mesh is None:
            self._forward = jax.jit(self._forward_fn())
            self._ppo_step = jax.jit(make_ppo_step(self.module, config), donate_argnums=(0,))
        else:
            self._jit_on_mesh(mesh)
        self.dataset = dataset
        self.data_collator = data_collator
        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None
        self.current_step = 0
        self.log_history: List[Dict[str, Any]] = []
        self._logger = None
        self._gen_rng = jax.random.PRNGKey(config.seed + 1)

    # -- helpers ----------------------------------------------------------------------------
    def _forward_fn(self):
        forward = make_forward_rollout(self.module, self.config.kl_penalty)
        shared = self.num_shared_layers is not None

        def fn(params, ref_params, queries, qmask, responses, rmask):
            ref = merge_reference(params, ref_params) if shared else ref_params
            return forward(params, ref, queries, qmask, responses, rmask)

        return fn

    def _jit_on_mesh(self, mesh) -> None:
        """Shard the state by the family's rules (params, reference, Adam moments) and jit the
        forward pass and ``ppo_step`` with batch-sharded rollouts (rows on data x fsdp)."""
        from rljax.sharding import (
            batch_sharding,
            batch_size_divisor,
            jit_sharded,
            replicated,
            shard_state,
            state_shardings,
        )

        if self.config.mini_batch_size % batch_size_divisor(mesh):
            raise ValueError(
                f"mini_batch_size={self.config.mini_batch_size} must be a multiple of the mesh's data x fsdp size "
                f"({batch_size_divisor(mesh)})."
            )
        self.state = shard_state(self.state, mesh)
        sh = state_shardings(self.state, mesh)
        rows = batch_sharding(mesh)
        self._forward = jit_sharded(
            self._forward_fn(), mesh, in_shardings=(sh.params, sh.ref_params, rows, rows, rows, rows), out_shardings=rows
        )
        self._ppo_step = jit_sharded(
            make_ppo_step(self.module, self.config), mesh, in_shardings=(sh, rows, rows),
            out_shardings=(sh, replicated(mesh)), donate_argnums=(0,),
        )

    @property
    def params(self):
        return self.state.params

    def prepare_dataloader(self, dataset: Any, data_collator: Optional[Callable] = None) -> BatchIterator:
        """Shuffled batches of ``config.batch_size`` (drop_last, as TRL), one epoch per iteration."""
        collate = data_collator if data_collator is not None else _collate_columns
        return BatchIterator(
            dataset, self.config.batch_size, shuffle=True, seed=self.config.seed, drop_last=True, num_epochs=1,
            collate_fn=collate,
        )

    def _pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return 0

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
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            if length_sampler is not None:
                kw["max_new_tokens"] = int(length_sampler())
            P = bucket_length(max(len(q) for q in chunk), 8)
            rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # static batch shape
            ids = pad_sequences(rows, kw["pad_token_id"], "left", P)
            mask = pad_sequences([np.ones(len(q), np.int32) for q in rows], 0, "left", P)
            rng, k1, k2 = jax.random.split(rng, 3)
            for params, sink, key in ((policy_params, outs, k1),) + (((ref_full, ref_outs, k2),) if generate_ref_response else ()):
                gen = _generate(self.module, params, ids, mask, key, **kw)
                seqs = np.asarray(gen.sequences)[: len(chunk)]
                resp = strip_responses(seqs, P, kw.get("eos_token_id"), kw["pad_token_id"], remove_padding=remove_padding)
                for q, r in zip(chunk, resp):
                    sink.append(np.concatenate([q, r]) if return_prompt else r)
        if single:  # TRL returns model.generate's [1, length] tensor for a single query
            outs, ref_outs = outs[0][None, :], (ref_outs[0][None, :] if ref_outs else None)
        return (outs, ref_outs) if generate_ref_response else outs

    # -- the step ---------------------------------------------------------------------------
    def _validate(self, queries, responses, scores, response_masks):
        bs = self.config.batch_size
        for name, xs in (("queries", queries), ("responses", responses)):
            if not isinstance(xs, (list, tuple)):
                raise ValueError(f"{name} must be a list of 1-D token arrays, got {type(xs).__name__}.")
            if len(xs) != bs:
                raise ValueError(f"Batch size ({bs}) does not match number of examples - but got {len(xs)} for: {name}")
        for i, r in enumerate(responses):
            if np.asarray(r).ndim != 1 or np.asarray(r).size == 0:
                raise ValueError(f"responses[{i}] is empty or not 1-D; every response needs at least one token.")
        for i, q in enumerate(queries):
            if np.asarray(q).ndim != 1 or np.asarray(q).size == 0:
                raise ValueError(f"queries[{i}] is empty or not 1-D.")
        if response_masks is not None:
            if len(response_masks) != bs:
                raise ValueError(f"response_masks has {len(response_masks)} entries, expected {bs}.")
            for i, (m, r) in enumerate(zip(response_masks, responses)):
                if np.shape(m) != np.shape(r):
                    raise ValueError(f"response_masks[{i}] has shape {np.shape(m)}, its response {np.shape(r)}.")
        return validate_scores(scores, bs)

    def step(self, queries: Sequence[Any], responses: Sequence[Any], scores: Sequence[Any], response_masks=None) -> Dict[str, Any]:
        """One PPO iteration on ``batch_size`` (query, response, score) triples.

        queries/responses: lists of 1-D token arrays; scores: list of scalars or a [batch] array.
        ``response_masks``: optional per-response 0/1 masks (tokens to leave out of the loss).
        Returns TRL's stats dict (numpy arrays and floats) incl. ``time/ppo/*``.
        """
        t0 = time.time()
        scores = self._validate(queries, responses, scores, response_masks)
        pad = self._pad_token_id()
        queries = [np.asarray(q) for q in queries]
        responses = [np.asarray(r) for r in responses]
        P = bucket_length(max(len(q) for q in queries), 8)
        N = bucket_length(max(len(r) for r in responses), 8)
        q = pad_sequences(queries, pad, "left", P)
        qm = pad_sequences([np.ones(len(x), np.int32) for x in queries], 0, "left", P)
        r = pad_sequences(responses, pad, "right", N)
        rm = pad_sequences([np.ones(len(x), np.int32) for x in responses], 0, "right", N)
        t = time.time()
        rollout = self._forward(self.state.params, self.state.ref_params, q, qm, r, rm)
        if response_masks is not None:
            extra = pad_sequences([np.asarray(m) for m in response_masks], 0, "right", N).astype(np.float32)
            shifted = np.concatenate([np.zeros((len(queries), P - 1), np.float32), extra], axis=1)
            rollout = rollout.replace(masks=rollout.masks * shifted)
        jax.block_until_ready(rollout.logprobs)
        t_forward = time.time() - t
        t = time.time()
        self.state, stats = self._ppo_step(self.state, rollout, jnp.asarray(scores))
        jax.block_until_ready(stats)
        t_opt = time.time() - t
        t = time.time()
        stats = convert_to_scalar(stats_to_np(jax.device_get(stats)))
        t_stats = time.time() - t
        self.kl_ctl_value = float(self.state.kl.value)
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
        """Save the policy (with value head) in HF format."""
        from rljax.models.heads import save_value_head_model

        save_value_head_model(self.module, self.state.params, path, overwrite=overwrite)


# ==========================================================================
# Host-side helpers
# ==========================================================================


def _copy_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def _unpack(model: Any):
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if hasattr(model, "module") and hasattr(model, "params"):
        return model.module, model.params
    raise ValueError("model must be an AutoModelForCausalLMWithValueHead (with .module/.params) or a (module, params) pair.")


def _collate_columns(examples: List[Dict[str, Any]]) -> Dict[str, list]:
    """TRL's default PPO collator: a dict of lists, one per column."""
    return {k: [ex[k] for ex in examples] for k in examples[0]}


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
