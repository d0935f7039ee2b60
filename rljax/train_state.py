"""TrainState pytrees: everything a training step reads and writes, and nothing else.

The optax transformation is a static field (not a leaf), so a TrainState can be
passed through ``jax.jit``, checkpointed with orbax and sharded like any pytree.
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, step counter and PRNG key of one trained model."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: Optional[jax.Array] = None) -> "TrainState":
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng, tx=tx)

    def apply_gradients(self, grads: Any) -> "TrainState":
        """One optimizer update; returns the new state (step + 1)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def split_rng(self) -> tuple["TrainState", jax.Array]:
        """Advance the state's key and return a fresh subkey."""
        rng, sub = jax.random.split(self.rng)
        return self.replace(rng=rng), sub
