"""TRL's ``RLOOConfig`` / ``RLOOTrainer`` (v0.19, ``rloo_k`` and ``kl_coef``) as a thin shell over
``rljax.rloo``: the host side (prompts, batches, decoding for Python reward functions, logging)
around one jitted rollout and one jitted ``rloo_step``. The reward is a Python function on texts
(TRL's ``reward_model`` may be a callable on decoded texts too) or several, summed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rljax.rloo import RLOOSettings, RLOOTrainState, make_rloo_rollout, make_rloo_step
from rljax.trainers.base import TrainingArguments, make_optimizer
from rljax.trainers.online import OnlineShell, RewardFunc, fields_from, settings_of


@dataclasses.dataclass
@fields_from(RLOOSettings, skip=("batch_size", "gradient_accumulation_steps"))
class RLOOConfig(TrainingArguments):
    """TRL's ``RLOOConfig`` fields that rljax honours (names and defaults of TRL v0.19).
    ``per_device_train_batch_size`` counts completions per micro-batch; one rollout is
    ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` completions
    (TRL's ``batch_size``), i.e. that many / ``rloo_k`` prompts. The algorithm's fields
    (``rloo_k``, ``kl_coef``, ``cliprange``, ...) are ``rljax.rloo.RLOOSettings``'s, generated
    from it (same names, types, defaults); only ``temperature`` differs (TRL's 0.7)."""

    learning_rate: float = 3e-6
    logging_steps: int = 10
    max_steps: int = 100
    max_prompt_length: Optional[int] = 512
    """Prompts are left-truncated to this many tokens (None: the longest prompt)."""
    response_length: int = 53
    """Completion tokens per sample."""
    temperature: float = 0.7
    """Sampling temperature (TRL's RLOOConfig default); the log-probs divide the logits by it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps <= 0:
            raise ValueError("RLOOConfig: set max_steps > 0 (the number of rollouts to train on).")
        self.settings()

    def settings(self) -> RLOOSettings:
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
        return settings_of(self, RLOOSettings, batch_size=batch,
                           gradient_accumulation_steps=self.gradient_accumulation_steps)


class RLOOTrainer(OnlineShell):
    """``RLOOTrainer(model, reward_funcs, args, train_dataset, processing_class)``; ``train()`` runs
    ``args.max_steps`` rollouts and logs TRL's keys (``objective/kl``, ``objective/rlhf_reward``,
    ``objective/scores``, ``policy/clipfrac_avg``, ``val/ratio``, ... plus ``reward``, ``kl``,
    ``completion_length``, ``clip_ratio``). Several reward functions are summed (NaN as 0)."""

    _name = "RLOO"

    def __init__(self, model: Any, reward_funcs: Union[RewardFunc, Sequence[RewardFunc]],
                 args: Optional[RLOOConfig] = None, train_dataset: Any = None, processing_class: Any = None,
                 **kwargs: Any) -> None:
        args = args or RLOOConfig()
        super().__init__(model, reward_funcs, args, train_dataset, processing_class, **kwargs)
        self.settings = args.settings()
        if args.kl_coef != 0.0 and self.ref_params is None:
            self.ref_params = jax.tree_util.tree_map(jnp.copy, self.params)
        self.tx = make_optimizer(args, args.max_steps * args.num_ppo_epochs * args.num_mini_batches)
        gen = self._generate_fn(args.response_length, args.temperature, None, 1.0)
        self._rollout = jax.jit(make_rloo_rollout(self.module, gen, self.settings, eos_token_id=self.eos_id))
        self._step = jax.jit(make_rloo_step(self.module, self.settings, self.tx))
        self.state = RLOOTrainState.create(self.params, self.tx, ref_params=self.ref_params,
                                           rng=jax.random.PRNGKey(args.seed))

    def _group_size(self) -> int:
        return self.settings.rloo_k

    def _step_rewards(self, rewards: np.ndarray) -> np.ndarray:
        return np.nansum(rewards, axis=1)  # [B]: the reward functions summed, NaN ("not applicable") as 0


__all__ = ["RLOOConfig", "RLOOTrainer"]
