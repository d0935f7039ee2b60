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
from typing import Any, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rljax.grpo import GRPOSettings, GRPOTrainState, make_grpo_rollout, make_grpo_step
from rljax.trainers.base import TrainingArguments, make_optimizer
from rljax.trainers.online import OnlineShell, RewardFunc, fields_from, settings_of

# Settings fields the config spells its own way: derived from the batch fields, Optional in TRL,
# a list in TRL, or TrainingArguments' own.
_DERIVED = ("generation_batch_size", "steps_per_generation", "reward_weights", "gradient_accumulation_steps")


@dataclasses.dataclass
@fields_from(GRPOSettings, skip=_DERIVED)
class GRPOConfig(TrainingArguments):
    """TRL's ``GRPOConfig`` fields that rljax honours (names and defaults of TRL v0.19-v0.21).
    ``per_device_train_batch_size`` counts COMPLETIONS per optimizer update (TRL's meaning); one
    generation batch is ``per_device_train_batch_size * steps_per_generation`` completions.
    The algorithm's fields (``num_generations``, ``beta``, ``epsilon``, ``loss_type``, ...) are
    ``rljax.grpo.GRPOSettings``'s, generated from it (same names, types, defaults)."""

    learning_rate: float = 1e-6
    logging_steps: int = 10
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    max_prompt_length: Optional[int] = 512
    """Prompts are left-truncated to this many tokens (None: the longest prompt)."""
    steps_per_generation: Optional[int] = None
    """Optimizer updates per generation batch (None: gradient_accumulation_steps, as TRL)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off)."""
    top_k: Optional[int] = None
    """Top-k sampling (None: off)."""
    reward_weights: Optional[List[float]] = None
    """Weights of the reward functions (None: all 1)."""

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
        return settings_of(
            self, GRPOSettings, generation_batch_size=batch, steps_per_generation=steps,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            reward_weights=None if self.reward_weights is None else tuple(self.reward_weights),
        )


class GRPOTrainer(OnlineShell):
    """``GRPOTrainer(model, reward_funcs, args, train_dataset, processing_class)``: ``train()`` runs
    ``args.max_steps`` generation batches (each ``num_iterations * steps_per_generation`` updates)
    and logs TRL's keys (``reward``, ``reward_std``, ``kl``, ``completions/mean_length``,
    ``clip_ratio/region_mean``, ...) to ``log_history`` and ``output_dir/metrics.jsonl``.
    ``ref_params`` (default: a copy of the initial params) is used only when ``beta != 0``."""

    _name = "GRPO"

    def __init__(self, model: Any, reward_funcs: Union[RewardFunc, Sequence[RewardFunc]],
                 args: Optional[GRPOConfig] = None, train_dataset: Any = None, processing_class: Any = None,
                 **kwargs: Any) -> None:
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

    def _group_size(self) -> int:
        return self.settings.num_generations

    def _step_rewards(self, rewards: np.ndarray) -> np.ndarray:
        return rewards  # [B, F]: grpo_step weights and nansums them


__all__ = ["GRPOConfig", "GRPOTrainer"]
