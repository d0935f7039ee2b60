"""Tiny models, batches and PPO inputs shared by the sharding / checkpoint / multi-host tests.

Plain functions (not pytest fixtures) so the multi-host worker subprocess can use them too.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rljax.models.gpt2 import GPT2Config, GPT2LMHeadModel

VOCAB = 64


def tiny_gpt2_config(**kw) -> GPT2Config:
    base = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return GPT2Config(**base)


def tiny_gpt2(seed: int = 0, **kw):
    """(module, params) of a 2-layer, 32-wide GPT-2 (dropout 0.1 as HF's default)."""
    from rljax.models import init_params

    module = GPT2LMHeadModel(tiny_gpt2_config(**kw))
    return module, init_params(module, jax.random.PRNGKey(seed))


def tiny_value_model(seed: int = 0, n_layer: int = 1):
    """(CausalLMWithValueHead, params) over a tiny GPT-2: ``{"transformer": ..., "v_head": ...}``."""
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    lm, lm_params = tiny_gpt2(seed, n_layer=n_layer)
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, lm_params, rng=jax.random.PRNGKey(seed + 100))
    return model.module, model.params


def sft_batch(batch_size: int = 8, seq_len: int = 16, seed: int = 0) -> dict:
    """Right-padded LM batch: input_ids, attention_mask, labels (-100 on padding), numpy."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch_size, seq_len)).astype(np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=(batch_size,))
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 0)
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_state(module, params, lr: float = 1e-3, seed: int = 0, adam_eps: float = 1e-8):
    """An AdamW TrainState (HF defaults, grad clipping 1.0, linear warmup/decay) over ``params``."""
    from rljax.train_state import TrainState
    from rljax.trainers.base import TrainingArguments, make_optimizer

    args = TrainingArguments(learning_rate=lr, weight_decay=0.01, warmup_steps=2, max_steps=20, adam_epsilon=adam_eps)
    return TrainState.create(params, make_optimizer(args, 20), jax.random.PRNGKey(seed))


def ppo_config(**kw):
    from rljax.ppo import PPOConfig

    base = dict(
        batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-3,
        max_grad_norm=1.0, use_score_scaling=True, use_score_norm=True, seed=0, exp_name="test",
    )
    base.update(kw)
    return PPOConfig(**base)


def ppo_inputs(batch_size: int = 8, query_len: int = 6, response_len: int = 6, seed: int = 1):
    """Left-padded queries, right-padded responses and their masks (numpy)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(3, VOCAB, size=(batch_size, query_len)).astype(np.int32)
    r = rng.integers(3, VOCAB, size=(batch_size, response_len)).astype(np.int32)
    qlen = rng.integers(2, query_len + 1, size=(batch_size,))
    rlen = rng.integers(2, response_len + 1, size=(batch_size,))
    qmask = (np.arange(query_len)[None, :] >= query_len - qlen[:, None]).astype(np.int32)
    rmask = (np.arange(response_len)[None, :] < rlen[:, None]).astype(np.int32)
    return np.where(qmask > 0, q, 0), qmask, np.where(rmask > 0, r, 0), rmask


def ppo_setup(seed: int = 0, config: Optional[Any] = None, tx: Optional[Any] = None):
    """(module, config, state, rollout, scores): a fixed rollout of a tiny value-head GPT-2
    (1 layer). ``tx`` defaults to the config's optimizer (TRL's Adam)."""
    from rljax.ppo_train import PPOTrainState, make_forward_rollout

    config = config or ppo_config()
    module, params = tiny_value_model(seed)
    ref_params = jax.tree_util.tree_map(jnp.copy, params)
    state = PPOTrainState.create(params, ref_params, config, tx=tx)
    q, qm, r, rm = ppo_inputs(config.batch_size)
    rollout = jax.jit(make_forward_rollout(module))(params, ref_params, q, qm, r, rm)
    scores = jnp.asarray(np.random.default_rng(seed + 7).normal(size=(config.batch_size,)), jnp.float32)
    return module, config, state, rollout, scores


def to_numpy(tree: Any) -> Any:
    """Host copy of every array leaf (works on sharded arrays)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
