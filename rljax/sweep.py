"""Sweeps in one compiled run: ``jax.vmap`` over a whole training loop (purejaxrl's trick).

Every ``make_train`` in rljax (``rljax.ppo_train``, ``rljax.grpo``, ``rljax.rloo``) returns a
pure ``train(state, reward_params, prompts, prompt_mask) -> (state, stats)`` whose randomness
comes from ``state.rng`` and whose learning rate (with an ``optax.inject_hyperparams``
optimizer) lives in ``state.opt_state``. So a sweep is a batch of states::

    states = with_seeds(state, [0, 1, 2, 3])                  # or with_learning_rates(...)
    final, stats = make_sweep(train)(states, None, prompts, prompt_mask)
    rewards = curves(stats, "reward")                          # [4 runs, num_steps]
    plot_curves({"GRPO": rewards}, "reward.png")               # mean and spread

One compilation trains every run; the model's weights, the reward model and the prompt bank
are shared (not copied per run). Run ``i`` equals ``train`` on ``unstack(states, i)`` alone
(tested). Memory grows with the number of runs (params, optimizer states, activations).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree with a leading run axis."""
    if not trees:
        raise ValueError("stack needs at least one pytree.")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, i: int) -> Any:
    """Run ``i`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def num_runs(tree: Any) -> int:
    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


def with_seeds(state: Any, seeds: Sequence[int]) -> Any:
    """``len(seeds)`` copies of ``state`` (anything with ``.rng`` and ``.replace``), run ``i`` with
    ``rng = PRNGKey(seeds[i])``: same initial weights, different sampling and shuffling."""
    return stack([state.replace(rng=jax.random.PRNGKey(int(s))) for s in seeds])


def with_learning_rates(state: Any, learning_rates: Sequence[float]) -> Any:
    """``len(learning_rates)`` copies of ``state`` whose optimizer's injected ``learning_rate`` is
    ``learning_rates[i]``. The state's optimizer must come from ``optax.inject_hyperparams`` (e.g.
    ``injected_adam`` or ``rljax.ppo_train.make_ppo_optimizer``); a stacked state is accepted too
    (then ``len(learning_rates)`` must equal its number of runs)."""
    from rljax.ppo_train import has_learning_rate, set_learning_rate

    if not has_learning_rate(state.opt_state):
        raise ValueError(
            "with_learning_rates: the optimizer state has no injected learning_rate; build the optimizer with "
            "optax.inject_hyperparams (e.g. rljax.sweep.injected_adam(lr)) so the rate is a state leaf."
        )
    leaves = jax.tree_util.tree_leaves(state.rng)
    stacked = leaves and jnp.ndim(leaves[0]) == 2  # a stacked PRNGKey is [runs, 2]
    if stacked:
        n = num_runs(state)
        if n != len(learning_rates):
            raise ValueError(f"{len(learning_rates)} learning rates for a stacked state of {n} runs; give one per run.")
        return stack([state_i.replace(opt_state=set_learning_rate(state_i.opt_state, lr))
                      for state_i, lr in ((unstack(state, i), lr) for i, lr in enumerate(learning_rates))])
    return stack([state.replace(opt_state=set_learning_rate(state.opt_state, lr)) for lr in learning_rates])


def injected_adam(learning_rate: float, max_grad_norm: Optional[float] = None, **adam_kwargs: Any):
    """Adam (optional global-norm clipping first) with ``learning_rate`` as a state leaf, so
    ``with_learning_rates`` can sweep it without recompiling."""

    def build(learning_rate):
        parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
        return optax.chain(*parts, optax.adam(learning_rate, **adam_kwargs))

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def make_sweep(train: Callable, jit: bool = True) -> Callable:
    """``sweep(states, reward_params, prompts, prompt_mask) -> (states, stats)``: ``train`` vmapped
    over the leading run axis of ``states`` (the other arguments shared), jitted once. ``stats``
    leaves are ``[runs, num_steps, ...]``."""
    fn = jax.vmap(train, in_axes=(0, None, None, None))
    return jax.jit(fn) if jit else fn


def curves(stats: Mapping[str, Any], key: str) -> np.ndarray:
    """``stats[key]`` of a sweep as a float ``[runs, num_steps]`` numpy array."""
    if key not in stats:
        raise KeyError(f"{key!r} is not a logged stat; available: {sorted(stats)}")
    values = np.asarray(stats[key], np.float64)
    if values.ndim != 2:
        raise ValueError(f"stats[{key!r}] has shape {values.shape}; expected [runs, num_steps].")
    return values


def summarize(values: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-step ``mean``, ``std``, ``min``, ``max`` over runs of ``[runs, num_steps]`` curves."""
    values = np.asarray(values, np.float64)
    return {"mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0)}


def plot_curves(
    groups: Mapping[str, np.ndarray],
    path: str,
    *,
    title: str = "",
    ylabel: str = "reward",
    xlabel: str = "iteration",
    spread: str = "std",
) -> str:
    """Save a PNG of each group's mean curve with a shaded spread (``"std"``: mean +- std,
    ``"minmax"``: min to max over runs). ``groups``: label -> ``[runs, num_steps]`` curves (one
    run is drawn without a band). Returns ``path``. matplotlib is imported here only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if spread not in ("std", "minmax"):
        raise ValueError(f"spread must be 'std' or 'minmax', got {spread!r}.")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in groups.items():
        values = np.atleast_2d(np.asarray(values, np.float64))
        s = summarize(values)
        x = np.arange(1, values.shape[1] + 1)
        ax.plot(x, s["mean"], label=f"{label} (n={values.shape[0]})")
        if values.shape[0] > 1:
            lo, hi = (s["mean"] - s["std"], s["mean"] + s["std"]) if spread == "std" else (s["min"], s["max"])
            ax.fill_between(x, lo, hi, alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "curves",
    "injected_adam",
    "make_sweep",
    "num_runs",
    "plot_curves",
    "stack",
    "summarize",
    "unstack",
    "with_learning_rates",
    "with_seeds",
]
