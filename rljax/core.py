"""trl.core equivalents as pure, jittable `jnp` functions.

Semantics follow TRL 0.7.11 (`trl/core.py` and `RunningMoments` in
`trl/trainer/utils.py`) unless a docstring says "deliberate fix". Shapes are
`[batch, seq]` unless stated otherwise; `V` is the vocabulary size.

Log-softmax style reductions (`logprobs_from_logits`, `entropy_from_logits`)
are computed in at least float32, so bf16 logits do not lose precision.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, int]

# TRL pads ragged stats with this value before stacking them (`stack_dicts`).
WANDB_PADDING = -1

_MASK_SUM_ZERO_MSG = (
    "The sum of the mask is zero, so the variance is undefined. This can happen "
    "with `mini_batch_size=1` (a minibatch whose response is fully masked); "
    "increase `mini_batch_size` or `gradient_accumulation_steps`."
)
_MASK_SUM_ONE_MSG = (
    "The sum of the mask is one, so the unbiased variance divides by zero "
    "(TRL 0.7.11 returns inf/NaN here; rljax raises instead). This can happen "
    "with `mini_batch_size=1` and a one-token response; increase "
    "`mini_batch_size` or `gradient_accumulation_steps`, or use unbiased=False."
)


def _floating(x: ArrayLike) -> Array:
    """`x` as a jnp array with an inexact dtype (ints/bools -> float32)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return x


def _at_least_f32(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_concrete(x: Any) -> bool:
    """True when `x` holds known values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------


def logprobs_from_logits(logits: ArrayLike, labels: ArrayLike, gather: bool = True) -> Array:
    """Log-probabilities of `labels` under `logits`.

    logits: [batch, seq, V]; labels: [batch, seq] integer ids (any leading
    shape works as long as labels.shape == logits.shape[:-1]).
    Returns [batch, seq] (gather=True) or the full log-softmax [batch, seq, V].
    """
    logits = _at_least_f32(logits)
    if not gather:
        return jax.nn.log_softmax(logits, axis=-1)
    labels = jnp.asarray(labels)
    chex.assert_shape(labels, logits.shape[:-1])
    # log_softmax(x)[y] = x[y] - logsumexp(x): never materialises [B, T, V] log-probs.
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def logprobs_and_entropy(
    logits: ArrayLike, labels: ArrayLike, with_entropy: bool = True
) -> Tuple[Array, Optional[Array]]:
    """Log-probs of ``labels`` and the entropy of each distribution from ONE pass over ``logits``.

    logits: [..., V]; labels: [...] integer ids. Returns ``(logprobs [...], entropy [...] or
    None)``, float32 (at least): one ``logsumexp`` serves both, ``logprobs = logits[label] - lse``
    and ``entropy = lse - sum(softmax(logits) * logits)`` (TRL's formula), so no ``[..., V]``
    log-softmax or probability tensor has to be kept besides ``logits``.
    """
    logits = _at_least_f32(logits)
    labels = jnp.asarray(labels)
    chex.assert_shape(labels, logits.shape[:-1])
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not with_entropy:
        return picked - lse, None
    probs = jnp.exp(logits - lse[..., None])
    return picked - lse, lse - jnp.sum(probs * logits, axis=-1)


def entropy_from_logits(logits: ArrayLike) -> Array:
    """Entropy of softmax(logits) over the last axis: [..., V] -> [...].

    Computed as TRL does: logsumexp(logits) - sum(softmax(logits) * logits).
    """
    logits = _at_least_f32(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


# --------------------------------------------------------------------------
# Whitening and masked statistics
# --------------------------------------------------------------------------


def whiten(values: ArrayLike, shift_mean: bool = True) -> Array:
    """Whiten over all elements with the UNBIASED variance (torch.var), eps 1e-8."""
    values = _floating(values)
    mean = jnp.mean(values)
    var = jnp.var(values, ddof=1)
    whitened = (values - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def masked_mean(values: ArrayLike, mask: ArrayLike, axis: Optional[int] = None) -> Array:
    """sum(values * mask, axis) / sum(mask, axis), as TRL (an empty mask gives NaN)."""
    values = _floating(values)
    mask = jnp.asarray(mask, dtype=values.dtype)
    return jnp.sum(values * mask, axis=axis) / jnp.sum(mask, axis=axis)


def check_whiten_mask(mask: ArrayLike) -> None:
    """Host-side check for shells: raise when ``sum(mask)`` makes the unbiased masked
    variance undefined (0: TRL's ValueError; 1: TRL returns NaN, we raise). The jittable
    ``masked_var``/``masked_whiten`` never raise; call this on concrete masks before them."""
    if not _is_concrete(mask):
        return
    mask_sum = float(np.sum(np.asarray(mask, dtype=np.float64)))
    if mask_sum == 0:
        raise ValueError(_MASK_SUM_ZERO_MSG)
    if mask_sum == 1:
        raise ValueError(_MASK_SUM_ONE_MSG)


def _masked_var_guarded(values: Array, mask: Array, unbiased: bool) -> Array:
    """masked_var without checks: finite whenever the unmasked values are.

    Equal to TRL's formula whenever sum(mask) > 1 (unbiased) or > 0 (biased).
    Where TRL divides by zero, this returns the biased variance instead: 0 for
    an empty mask, and 0 (the biased variance of one element) for sum(mask)==1.
    """
    mask_sum = jnp.sum(mask)
    safe_sum = jnp.where(mask_sum > 0, mask_sum, 1.0)
    mean = jnp.sum(values * mask) / safe_sum
    var = jnp.sum(jnp.square(values - mean) * mask) / safe_sum
    if unbiased:
        defined = mask_sum > 1
        bessel = jnp.where(defined, mask_sum / jnp.where(defined, mask_sum - 1, 1.0), 1.0)
        var = var * bessel
    return var


def masked_var(values: ArrayLike, mask: ArrayLike, unbiased: bool = True) -> Array:
    """Variance of the unmasked elements of `values` (over all axes).

    unbiased=True applies Bessel's correction with the total unmasked count,
    as TRL does. One meaning, eager or under jit/vmap/grad: where the correction
    is undefined (sum(mask) <= 1; TRL raises for 0 and returns inf/NaN for 1) the
    biased variance is returned (0 for an empty or one-element mask), so no NaN or
    inf (and no NaN gradient) comes out for finite inputs. Shells validate concrete
    masks first with :func:`check_whiten_mask` (a clear ValueError).
    """
    values = _floating(values)
    mask_arr = jnp.asarray(mask, dtype=values.dtype)
    return _masked_var_guarded(values, mask_arr, unbiased=unbiased)


def masked_whiten(values: ArrayLike, mask: ArrayLike, shift_mean: bool = True) -> Array:
    """Whiten `values` with the masked mean and unbiased masked variance (eps 1e-8).

    Like TRL, EVERY position is transformed (masked positions are not zeroed).
    Same meaning eager and under jit: a one-element mask gives (values - mean) * 1e4
    (finite), an empty mask NaN (the masked mean is 0/0, as TRL); shells reject both
    beforehand with :func:`check_whiten_mask`.
    """
    values = _floating(values)
    mask_arr = jnp.asarray(mask, dtype=values.dtype)
    mean = masked_mean(values, mask_arr)
    var = _masked_var_guarded(values, mask_arr, unbiased=True)
    whitened = (values - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def clip_by_value(x: ArrayLike, tensor_min: ArrayLike, tensor_max: ArrayLike) -> Array:
    """max(min(x, tensor_max), tensor_min) with broadcastable array bounds."""
    return jnp.maximum(jnp.minimum(jnp.asarray(x), tensor_max), tensor_min)


# --------------------------------------------------------------------------
# Stats dictionaries (host side; used by trainer shells for logging)
# --------------------------------------------------------------------------


def flatten_dict(nested: Mapping, sep: str = "/") -> Dict[str, Any]:
    """Flatten nested mappings into one dict with `sep`-joined keys.

    Raises ValueError if a key already contains `sep`.
    """
    flat: Dict[str, Any] = {}

    def _walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if sep in key:
                raise ValueError(f"separator {sep!r} is not allowed in key {key!r}")
            if isinstance(value, Mapping):
                _walk(value, prefix + key + sep)
            else:
                flat[prefix + key] = value

    _walk(nested, "")
    return flat


def stack_dicts(stats_dicts: Sequence[Mapping[str, ArrayLike]]) -> Dict[str, np.ndarray]:
    """Per key: flatten each dict's value and stack them into [n_dicts, max_len].

    Shorter rows are padded with WANDB_PADDING (-1), as TRL's `stack_dicts`.
    """
    stacked: Dict[str, np.ndarray] = {}
    for key in stats_dicts[0]:
        rows = [np.asarray(d[key]).reshape(-1) for d in stats_dicts]
        width = max(row.shape[0] for row in rows)
        dtype = np.result_type(*[row.dtype for row in rows])
        out = np.full((len(rows), width), WANDB_PADDING, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        stacked[key] = out
    return stacked


def stats_to_np(stats_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """jax arrays -> numpy (bf16 -> float32); numpy/python number scalars -> float.

    0-d arrays stay arrays (as TRL); strings pass through untouched.
    """
    out: Dict[str, Any] = {}
    for key, value in stats_dict.items():
        if isinstance(value, jax.Array):
            value = np.asarray(jax.device_get(value))
            if value.dtype == jnp.bfloat16:
                value = value.astype(np.float32)
        if np.isscalar(value) and not isinstance(value, (str, bytes)):
            value = float(value)
        out[key] = value
    return out


def convert_to_scalar(stats: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn 0-d and single-element 1-d arrays into python scalars (for tensorboard)."""
    out: Dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, (np.ndarray, jax.Array)) and (
            value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1)
        ):
            value = value.item()
        out[key] = value
    return out


# --------------------------------------------------------------------------
# Running moments (TRL's RunningMoments as a pytree)
# --------------------------------------------------------------------------


@flax.struct.dataclass
class RunningMomentsState:
    """Running mean / variance of a scalar stream (float32 scalars).

    `std` is the unbiased running std; `count` starts at 1e-24 as in TRL.
    """

    mean: Array
    std: Array
    var: Array
    count: Array


def running_moments_init() -> RunningMomentsState:
    """TRL's initial moments: mean 0, std 1, var 1, count 1e-24."""
    f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
    return RunningMomentsState(mean=f32(0.0), std=f32(1.0), var=f32(1.0), count=f32(1e-24))


def running_moments_update(
    state: RunningMomentsState, xs: ArrayLike
) -> Tuple[RunningMomentsState, Array, Array]:
    """Fold a batch `xs` (any shape, all elements count) into the moments.

    Returns (new_state, batch_mean, batch_std) where batch_std is UNBIASED
    (N-1), exactly as TRL's `RunningMoments.update`; float32 throughout. As in
    TRL, a batch of one element gives a NaN batch std, and a first update with
    one element gives an infinite running std.
    """
    xs = jnp.asarray(xs, dtype=jnp.float32)
    n = jnp.asarray(xs.size, dtype=jnp.float32)
    xs_mean = jnp.mean(xs)
    xs_var = jnp.var(xs)  # biased, as torch.var_mean(unbiased=False)

    delta = xs_mean - state.mean
    tot_count = state.count + n
    new_sum = xs_var * n
    # The old sum of squares, re-centred on the combined mean.
    old_sum = state.var * state.count + jnp.square(delta) * state.count * n / tot_count
    new_var = (old_sum + new_sum) / tot_count
    new_state = RunningMomentsState(
        mean=state.mean + delta * n / tot_count,
        var=new_var,
        std=jnp.sqrt(new_var * tot_count / (tot_count - 1)),
        count=tot_count,
    )
    batch_std = jnp.sqrt(xs_var * n / (n - 1))
    return new_state, xs_mean, batch_std


# --------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------


class LengthSampler:
    """Sample an int uniformly from [min_value, max_value) (max EXCLUSIVE, as TRL).

    By default draws from the global `np.random` state like TRL (so
    `np.random.seed` makes it reproducible); pass `rng` (a seed or a
    `np.random.Generator`) for an independent, reproducible stream.
    """

    def __init__(
        self,
        min_value: int,
        max_value: int,
        rng: Union[None, int, np.random.Generator] = None,
    ):
        self.values: List[int] = list(range(min_value, max_value))
        if not self.values:
            raise ValueError(
                f"LengthSampler needs min_value < max_value (max is exclusive), "
                f"got min_value={min_value}, max_value={max_value}"
            )
        if rng is None or isinstance(rng, np.random.Generator):
            self._rng = rng
        else:
            self._rng = np.random.default_rng(rng)

    def __call__(self) -> int:
        source = np.random if self._rng is None else self._rng
        return int(source.choice(self.values))


__all__ = [
    "WANDB_PADDING",
    "LengthSampler",
    "RunningMomentsState",
    "clip_by_value",
    "convert_to_scalar",
    "entropy_from_logits",
    "flatten_dict",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "running_moments_init",
    "running_moments_update",
    "stack_dicts",
    "stats_to_np",
    "whiten",
]
