"""Later TRL's ``GRPOConfig`` / ``GRPOTrainer`` as a thin shell over ``rljax.grpo``.

The shell owns the host side: tokenizing and left-padding the prompts, drawing batches, decoding
completions for Python reward functions (TRL's ``reward_func(prompts, completions, **columns)
-> list[float]``, None = "not applicable"), logging and saving. The math is ``rljax.grpo``:
one jitted rollout (generate + the log-probs the loss needs) and one jitted ``grpo_step``.

    trainer = GRPOTrainer(model=(module, params), reward_funcs=[my_reward], args=GRPOConfig(...),
                          train_dataset=[{"prompt": "2+3="}, ...], processing_class=tokenizer)
    trainer.train()

For rewards that are JAX functions of the tokens, ``rljax.grpo.make_train`` runs the whole loop
as one compiled program instead (and ``rljax.sweep`` vmaps it over seeds).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rljax.data import pad_sequences
from rljax.generation import make_generate_fn
from rljax.grpo import GRPOSettings, GRPOTrainState, make_grpo_rollout, make_grpo_step
from rljax.trainers.base import TrainingArguments, make_optimizer, prepare_output_dir, resolve_model

RewardFunc = Callable[..., Sequence[Optional[float]]]


@dataclasses.dataclass
class GRPOConfig(TrainingArguments):
    """TRL's ``GRPOConfig`` fields that rljax honours (names and defaults of TRL v0.19-v0.21).
    ``per_device_train_batch_size`` counts COMPLETIONS per optimizer update (TRL's meaning); one
    generation batch is ``per_device_train_batch_size * steps_per_generation`` completions."""

    learning_rate: float = 1e-6
    logging_steps: int = 10
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    max_prompt_length: Optional[int] = 512
    """Prompts are left-truncated to this many tokens (None: the longest prompt)."""
    num_generations: int = 8
    """Completions sampled per prompt (the group of the group-relative advantage)."""
    max_completion_length: int = 256
    steps_per_generation: Optional[int] = None
    """Optimizer updates per generation batch (None: gradient_accumulation_steps, as TRL)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    beta: float = 0.0
    """KL coefficient (k3 estimator); 0 loads/runs no reference model."""
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    importance_sampling_level: str = "token"
    reward_weights: Optional[List[float]] = None
    scale_rewards: bool = True
    loss_type: str = "bnpo"
    mask_truncated_completions: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps <= 0:
            raise ValueError("GRPOConfig: set max_steps > 0 (the number of generation batches to train on).")
        self.settings()  # validates the algorithm's fields now

    def settings(self) -> GRPOSettings:
        steps = self.steps_per_generation or self.gradient_accumulation_steps
        batch = self.per_device_train_batch_size * steps
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {batch} must be a multiple of num_generations="
                f"{self.num_generations} (TRL's rule): change per_device_train_batch_size or num_generations."
            )
        return GRPOSettings(
            num_generations=self.num_generations, generation_batch_size=batch,
            max_completion_length=self.max_completion_length, beta=self.beta, epsilon=self.epsilon,
            epsilon_high=self.epsilon_high, delta=self.delta, importance_sampling_level=self.importance_sampling_level,
            scale_rewards=self.scale_rewards, loss_type=self.loss_type,
            mask_truncated_completions=self.mask_truncated_completions, num_iterations=self.num_iterations,
            steps_per_generation=steps, gradient_accumulation_steps=self.gradient_accumulation_steps,
            reward_weights=None if self.reward_weights is None else tuple(self.reward_weights),
        )


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

    def save_model(self, output_dir: Optional[str] = None) -> None:
        from rljax.models import save_pretrained

        save_pretrained(self.module, self.params, output_dir or self.args.output_dir, overwrite=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(output_dir or self.args.output_dir)


class GRPOTrainer(OnlineShell):
    """``GRPOTrainer(model, reward_funcs, args, train_dataset, processing_class)``: ``train()`` runs
    ``args.max_steps`` generation batches (each ``num_iterations * steps_per_generation`` updates)
    and logs TRL's keys (``reward``, ``reward_std``, ``kl``, ``completions/mean_length``,
    ``clip_ratio/region_mean``, ...) to ``log_history`` and ``output_dir/metrics.jsonl``.
    ``ref_params`` (default: a copy of the initial params) is used only when ``beta != 0``."""

    _name = "GRPO"

    def __init__(self, model: Any, reward_funcs: Union[RewardFunc, Sequence[RewardFunc]], args: Optional[GRPOConfig] = None,
                 train_dataset: Any = None, processing_class: Any = None, **kwargs: Any) -> None:
        args = args or GRPOConfig()
        super().__init__(model, reward_funcs, args, train_dataset, processing_class, **kwargs)
        self.settings = args.settings()
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} entries for {len(self.reward_funcs)} "
                             "reward functions; give one each.")
        if args.beta != 0.0 and self.ref_params is None:
            self.ref_params = jax.tree_util.tree_map(jnp.copy, self.params)
        updates = args.max_steps * self.settings.num_iterations * self.settings.steps_per_generation
        self.tx = make_optimizer(args, updates)
        gen = self._generate_fn(args.max_completion_length, args.temperature, args.top_k, args.top_p)
        self._rollout = jax.jit(make_grpo_rollout(self.module, gen, self.settings, eos_token_id=self.eos_id))
        self._step = jax.jit(make_grpo_step(self.module, self.settings, self.tx))
        self.state = GRPOTrainState.create(self.params, self.tx, ref_params=self.ref_params,
                                           rng=jax.random.PRNGKey(args.seed))

    def train(self) -> Dict[str, float]:
        args, s = self.args, self.settings
        prepare_output_dir(args.output_dir, args.overwrite_output_dir)
        start = time.time()
        for step in range(1, args.max_steps + 1):
            idx = self._draw(s.num_prompts)
            rng, key = jax.random.split(self.state.rng)
            self.state = self.state.replace(rng=rng)
            batch = self._rollout(self.state, self.prompts[idx], self.prompt_mask[idx], key)
            rewards = self._rewards(idx, s.num_generations, np.asarray(batch.completions),
                                    np.asarray(batch.completion_mask))
            self.state, stats = self._step(self.state, batch, rewards)
            if step % args.logging_steps == 0 or step == args.max_steps or (args.logging_first_step and step == 1):
                self._log(step, jax.device_get(stats))
        self.params = self.state.params
        return {"train_runtime": time.time() - start, "global_step": args.max_steps}


__all__ = ["GRPOConfig", "GRPOTrainer", "OnlineShell"]
