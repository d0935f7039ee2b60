"""What the online, critic-free shells (``GRPOTrainer``, ``RLOOTrainer``) share.

* ``OnlineShell``: model/tokenizer resolution, the left-padded prompt bank, shuffled prompt
  draws, Python reward functions on decoded texts at the host boundary (TRL's
  ``reward_func(prompts, completions, completion_ids, **columns) -> list[float | None]``),
  ``log_history`` + ``output_dir/metrics.jsonl``, ``save_model``.
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

import numpy as np

from rljax.data import pad_sequences
from rljax.generation import make_generate_fn
from rljax.trainers.base import prepare_output_dir, resolve_model

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

    def train(self) -> Dict[str, float]:
        """Run ``args.max_steps`` steps of the subclass's ``_train_loop``; metric sinks are closed
        even when a step raises. Returns ``train_runtime`` and ``global_step``."""
        args = self.args
        prepare_output_dir(args.output_dir, args.overwrite_output_dir)
        start = time.time()
        try:
            self._train_loop()
        finally:
            self._close_sinks()
        self.params = self.state.params
        return {"train_runtime": time.time() - start, "global_step": args.max_steps}

    def _train_loop(self) -> None:  # pragma: no cover - every shell defines it
        raise NotImplementedError

    def save_model(self, output_dir: Optional[str] = None) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir or self.args.output_dir, overwrite=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(output_dir or self.args.output_dir)


__all__ = ["OnlineShell", "RewardFunc", "fields_from", "settings_of"]
