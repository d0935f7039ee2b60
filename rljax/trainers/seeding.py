"""``set_seed`` (TRL: ``trl.core.set_seed``): reproducible host-side randomness for scripts.

What it means in JAX: JAX has no global random state. Every random draw in rljax takes an
explicit key (``rng=`` arguments; trainers derive theirs from ``config.seed`` /
``args.seed``), so a run is reproducible without calling ``set_seed``. What ``set_seed``
still controls is host-side randomness that scripts use: Python's ``random``, NumPy's global
state (e.g. ``rljax.core.LengthSampler`` without ``rng=``, TRL's query lengths) and, when
PyTorch is already imported (a ``transformers.pipeline`` reward), torch's generators, as TRL
does. It returns ``jax.random.PRNGKey(seed)`` for the script's own JAX draws.
"""
from __future__ import annotations

import random
import sys

import numpy as np

__all__ = ["set_seed"]


def set_seed(seed: int):
    """Seed Python's ``random``, NumPy and (if imported) torch; return ``jax.random.PRNGKey(seed)``.

    Args:
        seed: a non-negative int.

    Returns:
        A JAX PRNG key (``uint32[2]``) to pass on as ``rng=`` / split for the script's own draws.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"set_seed needs a non-negative int seed, got {seed!r}.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")  # seed torch only when the script already uses it (no import cost)
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(seed)
    import jax

    return jax.random.PRNGKey(seed)
