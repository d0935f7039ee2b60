"""What the online, critic-free shells (``GRPOTrainer``, ``RLOOTrainer``) share.

* ``OnlineShell``: model/tokenizer resolution, the left-padded prompt bank, shuffled prompt
  draws, Python reward functions on decoded texts at the host boundary (TRL's
  ``reward_func(prompts, completions, completion_ids, **columns) -> list[float | None]``),
  ``log_history`` + ``output_dir/metrics.jsonl``, the training loop (``train``: one jitted
  rollout and one jitted update per step), checkpoints (``checkpoint-<step>/``) and resuming
  from them, ``save_model``.
* ``fields_from(settings_cls)``: a class decorator that gives a TRL-style config dataclass the
  fields of the algorithm's frozen settings (``rljax.grpo.GRPOSettings``,
  ``rljax.rloo.RLOOSettings``) with the same names, types and defaults, so the two cannot
  drift; ``settings_of(config, settings_cls, **derived)`` builds the settings back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import jax
import numpy as np

from rljax.data import pad_sequences
from rljax.generation import make_generate_fn
from rljax.trainers.base import (
    find_resume_checkpoint,
    prepare_output_dir,
    resolve_model,
    restore_train_state,
    rotate_checkpoints,
    save_train_state,
)

RewardFunc = Callable[..., Sequence[Optional[float]]]


# --------------------------------------------------------------------------
# Config fields generated from the algorithm's settings
# --------------------------------------------------------------------------


def fields_from(settings_cls: type, skip: Sequence[str] = ()) -> Callable[[type], type]:
    """Decorator (apply it UNDER ``@dataclasses.dataclass``): add every field of the frozen
    dataclass ``settings_cls`` (type and default) to the decorated class, except those in
    ``skip`` and those the class declares itself (its own declaration wins: an explicit,
    visible override). The generated fields come after the class's own. ``rljax.cli`` reads
    their ``--help`` text from ``settings_cls`` (``__fields_from__``)."""

    def wrap(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        hints = typing.get_type_hints(settings_cls)
        added = {}
        for f in dataclasses.fields(settings_cls):
            if f.name in skip or f.name in own or not f.init:
                continue
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{settings_cls.__name__}.{f.name} has no default; a config field needs one.")
            added[f.name] = hints[f.name]
            setattr(cls, f.name, f.default)
        cls.__annotations__ = {**own, **added}
        cls.__fields_from__ = (*getattr(cls, "__fields_from__", ()), settings_cls)
        return cls

    return wrap


def settings_of(config: Any, settings_cls: type, **derived: Any) -> Any:
    """``settings_cls(**shared fields of config, **derived)``: the fields named alike are copied,
    ``derived`` supplies the rest (e.g. a batch size the config computes)."""
    names = {f.name for f in dataclasses.fields(settings_cls) if f.init}
    values = {n: getattr(config, n) for n in names if n not in derived and hasattr(config, n)}
    return settings_cls(**values, **derived)


# --------------------------------------------------------------------------
# The shell
# --------------------------------------------------------------------------


def _rows(dataset: Any) -> List[Dict[str, Any]]:
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    return [dict(r) for r in dataset]


class OnlineShell:
    """What the GRPO and RLOO shells share: model/tokenizer resolution, prompt bank, batch drawing,
    reward functions at the host boundary, logging, saving."""

    _name = "Online"

    def __init__(self, model: Any, reward_funcs: Union[RewardFunc, Sequence[RewardFunc]], args: Any,
                 train_dataset: Any, processing_class: Any = None, *, params: Any = None,
                 ref_params: Any = None) -> None:
        if processing_class is None:
            raise ValueError(f"{self._name}Trainer needs processing_class= (the tokenizer) to encode prompts and "
                             "decode completions.")
        self.args, self.tokenizer = args, processing_class
        self.module, self.params = resolve_model(model, params)
        self.ref_params = ref_params
        self.reward_funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not self.reward_funcs:
            raise ValueError("reward_funcs is empty: give at least one reward function.")
        self.rows = _rows(train_dataset)
        if not self.rows or "prompt" not in self.rows[0]:
            raise ValueError(f"train_dataset must be a non-empty dataset with a 'prompt' column (got "
                             f"{sorted(self.rows[0]) if self.rows else 'no rows'}).")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        ids = [self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in self.rows]
        limit = getattr(args, "max_prompt_length", None)
        if limit:
            ids = [x[-limit:] for x in ids]
        self.prompts = pad_sequences(ids, self.pad_id, side="left")
        self.prompt_mask = pad_sequences([[1] * len(x) for x in ids], 0, side="left")
        self.log_history: List[Dict[str, float]] = []
        self._metric_logger: Any = None  # report_to's sinks besides metrics.jsonl, built on the first _log
        self._order_rng = np.random.RandomState(args.seed)
        self._order: List[int] = []

    def _generate_fn(self, max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float):
        return make_generate_fn(self.module, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                top_k=top_k or 0, top_p=top_p, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                jit=False)

    def _draw(self, n: int) -> np.ndarray:
        """``n`` prompt indices: shuffled epochs over the dataset (drop_last)."""
        if len(self.rows) < n:
            raise ValueError(f"train_dataset has {len(self.rows)} prompts, fewer than the {n} one step needs.")
        if len(self._order) < n:
            self._order = list(self._order_rng.permutation(len(self.rows)))
        idx, self._order = self._order[:n], self._order[n:]
        return np.asarray(idx)

    def _rewards(self, idx: np.ndarray, repeat: int, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[B, F] float32 rewards from the Python reward functions on decoded texts (None -> NaN)."""
        rows = [self.rows[i] for i in np.repeat(idx, repeat)]
        texts = [self.tokenizer.decode([t for t, m in zip(c, k) if m and t != self.eos_id], skip_special_tokens=True)
                 for c, k in zip(completions.tolist(), mask.tolist())]
        prompts = [r["prompt"] for r in rows]
        ids = [[t for t, m in zip(c, k) if m] for c, k in zip(completions.tolist(), mask.tolist())]
        extra = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        out = np.full((len(rows), len(self.reward_funcs)), np.nan, np.float32)
        for j, fn in enumerate(self.reward_funcs):
            values = fn(prompts=prompts, completions=texts, completion_ids=ids, **extra)
            if len(values) != len(rows):
                raise ValueError(f"reward function {getattr(fn, '__name__', j)} returned {len(values)} rewards for "
                                 f"{len(rows)} completions; return one per completion.")
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out

    def _log(self, step: int, stats: Dict[str, Any]) -> None:
        entry = {"step": step}
        for k, v in stats.items():
            v = np.asarray(v)
            if v.ndim == 0:
                entry[k] = float(v)
            elif k == "rewards/mean_per_func":
                for fn, x in zip(self.reward_funcs, v):
                    entry[f"rewards/{getattr(fn, '__name__', 'reward')}/mean"] = float(x)
        self.log_history.append(entry)
        with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        logger = self._sinks()
        if logger is not None:
            logger.log({k: v for k, v in entry.items() if k != "step"}, step)

    def _sinks(self) -> Any:
        """``rljax.logging.MetricLogger`` for ``args.report_to``'s sinks besides metrics.jsonl
        (stdout, tensorboard, wandb); None when there are none."""
        if self._metric_logger is None:
            from rljax.logging import MetricLogger, resolve_sink_names

            names = [n for n in resolve_sink_names(getattr(self.args, "report_to", None)) if n != "jsonl"]
            if names:
                name = getattr(self.args, "run_name", None) or type(self).__name__
                self._metric_logger = MetricLogger(names, self.args.output_dir, config=self.args.to_dict(),
                                                   project_name=name)
        return self._metric_logger

    def _close_sinks(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
            self._metric_logger = None

    # ------------------------------------------------------------------ the loop

    def _group_size(self) -> int:  # pragma: no cover - every shell defines it
        """Completions per prompt (GRPO's ``num_generations``, RLOO's ``rloo_k``)."""
        raise NotImplementedError

    def _step_rewards(self, rewards: np.ndarray) -> np.ndarray:  # pragma: no cover - every shell defines it
        """The jitted step's reward argument from the ``[B, F]`` rewards of the reward functions."""
        raise NotImplementedError

    def _train_step(self, step: int) -> None:
        """One generation batch: draw prompts, roll out (jitted), score on the host, update (jitted)."""
        idx = self._draw(self.settings.num_prompts)
        rng, key = jax.random.split(self.state.rng)
        self.state = self.state.replace(rng=rng)
        batch = self._rollout(self.state, self.prompts[idx], self.prompt_mask[idx], key)
        rewards = self._rewards(idx, self._group_size(), np.asarray(batch.completions),
                                np.asarray(batch.completion_mask))
        self.state, stats = self._step(self.state, batch, self._step_rewards(rewards))
        args = self.args
        if step % args.logging_steps == 0 or step == args.max_steps or (args.logging_first_step and step == 1):
            self._log(step, jax.device_get(stats))

    def train(self, resume_from_checkpoint: Union[None, bool, str] = None) -> Dict[str, float]:
        """Run generation batches up to ``args.max_steps``; metric sinks are closed even when a
        step raises. Returns ``train_runtime`` and ``global_step``.

        Checkpoints (HF's layout, as the other trainers): ``output_dir/checkpoint-<step>/`` holds
        the policy (HF format, with the tokenizer) and ``train_state/`` (params, reference
        params, optimizer state, step counter, PRNG key, the number of prompt draws so far and
        the log history), written every ``save_steps`` steps (``save_strategy="steps"``) and at
        the last step (unless ``save_strategy="no"``), keeping ``save_total_limit``.
        ``resume_from_checkpoint`` (default ``args.resume_from_checkpoint``): a
        ``checkpoint-<step>`` directory, a directory holding them (the newest intact one), or
        True for ``args.output_dir``; the run then continues as if it had never stopped (same
        args, dataset and reward functions required): same prompts, same samples, same updates."""
        args = self.args
        if resume_from_checkpoint is None:
            resume_from_checkpoint = getattr(args, "resume_from_checkpoint", None)
        start = 0
        if resume_from_checkpoint not in (None, False):
            source = args.output_dir if resume_from_checkpoint is True else resume_from_checkpoint
            start = self._resume(find_resume_checkpoint(source))
        else:
            prepare_output_dir(args.output_dir, args.overwrite_output_dir)
        begin = time.time()
        try:
            for step in range(start + 1, args.max_steps + 1):
                self._train_step(step)
                final = step == args.max_steps and args.save_strategy != "no"
                if final or (args.save_strategy == "steps" and args.save_steps > 0 and step % args.save_steps == 0):
                    self._save_checkpoint(step)
        finally:
            self._close_sinks()
        self.params = self.state.params
        return {"train_runtime": time.time() - begin, "global_step": args.max_steps}

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, step: int) -> None:
        """``output_dir/checkpoint-<step>/``: the policy (HF format) and the resumable ``train_state``."""
        directory = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        self.params = self.state.params
        self.save_model(directory)
        # data_position: prompt draws so far (one per step); replayed on resume
        save_train_state(directory, self.state, step, step, self.log_history)
        rotate_checkpoints(self.args.output_dir, getattr(self.args, "save_total_limit", None))

    def _resume(self, checkpoint_dir: str) -> int:
        """Restore the train state, prompt-sampler position and log history of ``checkpoint_dir``;
        returns its step."""
        from rljax.logging import drop_jsonl_records_after

        self.state, extra = restore_train_state(checkpoint_dir, self.state)
        start = int(extra["step"])
        if start > self.args.max_steps:
            raise ValueError(f"resume_from_checkpoint: {checkpoint_dir} is at step {start}, past max_steps="
                             f"{self.args.max_steps}.")
        self._order_rng, self._order = np.random.RandomState(self.args.seed), []
        for _ in range(int(extra["data_position"])):  # the host-side sampler: replay its draws
            self._draw(self.settings.num_prompts)
        self.log_history = [dict(h) for h in extra.get("log_history", [])]
        os.makedirs(self.args.output_dir, exist_ok=True)
        drop_jsonl_records_after(os.path.join(self.args.output_dir, "metrics.jsonl"), start)
        self.params = self.state.params
        return start

    def save_model(self, output_dir: Optional[str] = None) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir or self.args.output_dir, overwrite=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(output_dir or self.args.output_dir)


__all__ = ["OnlineShell", "RewardFunc", "fields_from", "settings_of"]
