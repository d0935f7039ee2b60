"""rljax.core vs float64 torch transcriptions of TRL 0.7.11's trl.core formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rljax import core

RTOL, ATOL = 1e-5, 1e-6  # float32 (ours) vs float64 (reference)


# ---------------------------------------------------------------------------
# Reference implementations: TRL 0.7.11 formulas transcribed in torch (float64)
# ---------------------------------------------------------------------------


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def ref_logprobs_from_logits(logits, labels, gather=True):
    logp = F.log_softmax(logits, dim=2)
    if not gather:
        return logp
    return torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


def ref_whiten(values, shift_mean=True):
    mean, var = torch.mean(values), torch.var(values)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def ref_masked_mean(values, mask, axis=None):
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def ref_masked_var(values, mask, unbiased=True):
    mean = ref_masked_mean(values, mask)
    var = ref_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def ref_masked_whiten(values, mask, shift_mean=True):
    mean, var = ref_masked_mean(values, mask), ref_masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def ref_entropy_from_logits(logits):
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


class RefRunningMoments:
    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs):
        n = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - self.mean
        tot = self.count + n
        new_sum = xs_var * n
        old_sum = self.var * self.count + delta**2 * self.count * n / tot
        self.mean = self.mean + delta * n / tot
        self.var = (old_sum + new_sum) / tot
        self.std = torch.sqrt(self.var * tot / (tot - 1))
        self.count = tot
        return xs_mean.item(), torch.sqrt(xs_var * n / (n - 1)).item()


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_mask(rng, shape):
    mask = (rng.random(shape) > 0.3).astype(np.float32)
    mask[0, 0] = 0.0  # always at least one zero
    mask[0, 1] = 1.0  # and at least two ones
    mask[-1, -1] = 1.0
    return mask


# ---------------------------------------------------------------------------
# TRL's own tests/test_core.py cases
# ---------------------------------------------------------------------------

TRL_VALUES = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
TRL_MASK = np.array([0, 1, 1, 0], dtype=np.float32)


def test_trl_masked_mean_case():
    assert float(core.masked_mean(TRL_VALUES, TRL_MASK)) == pytest.approx(2.5)


def test_trl_masked_var_case_is_unbiased():
    assert float(core.masked_var(TRL_VALUES, TRL_MASK)) == pytest.approx(torch.var(torch.tensor([2.0, 3.0])).item())


def test_trl_masked_whiten_case_matches_whiten_of_unmasked():
    got = np.asarray(core.masked_whiten(TRL_VALUES, TRL_MASK))[1:3]
    close(got, np.asarray(core.whiten(np.array([2.0, 3.0], np.float32))), atol=1e-5)


# ---------------------------------------------------------------------------
# Parity on random inputs
# ---------------------------------------------------------------------------


def test_logprobs_from_logits_matches_reference(rng):
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 5))
    close(core.logprobs_from_logits(logits, labels), ref_logprobs_from_logits(t(logits), torch.tensor(labels)))
    full = core.logprobs_from_logits(logits, labels, gather=False)
    assert full.shape == (3, 5, 11)
    close(full, ref_logprobs_from_logits(t(logits), None, gather=False))


def test_logprobs_from_logits_upcasts_bf16(rng):
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(2, 3))
    out = core.logprobs_from_logits(jnp.asarray(logits, jnp.bfloat16), labels)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_reference_unbiased(rng, shift_mean):
    values = rng.normal(2.0, 3.0, size=(4, 6)).astype(np.float32)
    close(core.whiten(values, shift_mean=shift_mean), ref_whiten(t(values), shift_mean), atol=1e-5)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_mean_matches_reference(rng, axis):
    values = rng.normal(size=(4, 6)).astype(np.float32)
    mask = random_mask(rng, (4, 6))
    mask[:, 0] = 1.0  # every column/row non-empty for the axis cases
    mask[0, :] = 1.0
    close(core.masked_mean(values, mask, axis=axis), ref_masked_mean(t(values), t(mask), axis=axis))


def test_masked_mean_accepts_int_and_bool_masks(rng):
    values = rng.normal(size=(3, 4)).astype(np.float32)
    mask = random_mask(rng, (3, 4))
    expected = ref_masked_mean(t(values), t(mask))
    close(core.masked_mean(values, mask.astype(np.int32)), expected)
    close(core.masked_mean(values, mask.astype(bool)), expected)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_reference(rng, unbiased):
    values = rng.normal(1.0, 2.0, size=(4, 7)).astype(np.float32)
    mask = random_mask(rng, (4, 7))
    close(core.masked_var(values, mask, unbiased=unbiased), ref_masked_var(t(values), t(mask), unbiased))
    jitted = jax.jit(core.masked_var, static_argnums=2)(values, mask, unbiased)
    close(jitted, ref_masked_var(t(values), t(mask), unbiased))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_transforms_every_position_like_trl(rng, shift_mean):
    values = rng.normal(1.0, 2.0, size=(4, 7)).astype(np.float32)
    mask = random_mask(rng, (4, 7))
    got = core.masked_whiten(values, mask, shift_mean=shift_mean)
    expected = ref_masked_whiten(t(values), t(mask), shift_mean)
    close(got, expected, atol=1e-5)
    # masked positions are transformed, not zeroed
    assert np.all(np.asarray(got)[mask == 0] != 0)
    close(jax.jit(core.masked_whiten, static_argnums=2)(values, mask, shift_mean), expected, atol=1e-5)


def test_clip_by_value_with_array_bounds(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    lo = rng.normal(-0.5, 0.1, size=(3, 4)).astype(np.float32)
    hi = lo + 0.6
    expected = torch.max(torch.min(t(x), t(hi)), t(lo))
    close(core.clip_by_value(x, lo, hi), expected)
    close(jax.jit(core.clip_by_value)(x, lo, hi), expected)


def test_entropy_from_logits_matches_reference(rng):
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32) * 2
    expected = ref_entropy_from_logits(t(logits))
    close(core.entropy_from_logits(logits), expected)
    close(torch.distributions.Categorical(logits=t(logits)).entropy(), expected)  # sanity of the reference


def test_logprobs_and_entropy_fuse_both_from_one_pass(rng):
    """One logsumexp serves the taken-token log-probs and TRL's entropy (1e-6 of the separate
    functions); the compiled program keeps no [B, T, V] log-softmax besides the logits."""
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32) * 2
    labels = rng.integers(0, 9, size=(2, 5))
    lp, ent = core.logprobs_and_entropy(logits, labels)
    close(lp, core.logprobs_from_logits(logits, labels), atol=1e-6)
    close(ent, ref_entropy_from_logits(t(logits)), atol=1e-6)
    lp_only, none = core.logprobs_and_entropy(logits, labels, with_entropy=False)
    assert none is None
    close(lp_only, lp, atol=0)
    big, big_labels = jnp.zeros((4, 16, 1024), jnp.float32), jnp.zeros((4, 16), jnp.int32)
    mem = jax.jit(core.logprobs_and_entropy).lower(big, big_labels).compile().memory_analysis()
    if mem is not None:  # fused into reductions: far less scratch than one [4, 16, 1024] float32 tensor
        assert mem.temp_size_in_bytes < 4 * 16 * 1024 * 4 // 8, mem.temp_size_in_bytes


# ---------------------------------------------------------------------------
# masked_var / masked_whiten corner cases
# ---------------------------------------------------------------------------


def test_check_whiten_mask_raises_for_shells():
    """Host-side validation (the shells call it): sum 0 is TRL's ValueError, sum 1 our fix
    (TRL returns inf/NaN)."""
    with pytest.raises(ValueError, match="mini_batch_size"):
        core.check_whiten_mask(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="sum of the mask is one"):
        core.check_whiten_mask(np.array([0, 0, 1, 0], np.float32))
    core.check_whiten_mask(jnp.array([0, 1, 1, 0]))  # fine


@pytest.mark.parametrize("mask", [[0, 0, 0, 0], [0, 0, 1, 0]])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_means_the_same_eager_and_under_jit(mask, unbiased):
    """One jit-safe meaning: where Bessel's correction is undefined, the biased variance (0)."""
    mask = np.asarray(mask, np.float32)
    eager = core.masked_var(TRL_VALUES, mask, unbiased=unbiased)
    jitted = jax.jit(core.masked_var, static_argnums=2)(TRL_VALUES, mask, unbiased)
    assert float(eager) == float(jitted) == 0.0
    if mask.sum() == 1:
        np.testing.assert_array_equal(core.masked_whiten(TRL_VALUES, mask), jax.jit(core.masked_whiten)(TRL_VALUES, mask))


@pytest.mark.parametrize("mask", [[0, 0, 0, 0], [0, 0, 1, 0]])
def test_masked_var_and_whiten_inside_jit_stay_finite(mask):
    mask = jnp.asarray(mask, jnp.float32)
    var = jax.jit(core.masked_var)(TRL_VALUES, mask)
    assert np.isfinite(float(var)) and float(var) == 0.0
    grad = jax.jit(jax.grad(core.masked_var))(jnp.asarray(TRL_VALUES), mask)
    assert np.all(np.isfinite(np.asarray(grad)))
    if float(mask.sum()) == 1:
        white = jax.jit(core.masked_whiten)(TRL_VALUES, mask)
        assert np.all(np.isfinite(np.asarray(white)))


def test_masked_var_under_vmap_is_guarded():
    masks = jnp.array([[0, 1, 1, 0], [0, 0, 1, 0]], jnp.float32)
    out = jax.vmap(core.masked_var, in_axes=(None, 0))(jnp.asarray(TRL_VALUES), masks)
    close(out, [0.5, 0.0])


# ---------------------------------------------------------------------------
# Stats dict helpers
# ---------------------------------------------------------------------------


def test_flatten_dict_nested_and_rejects_separator_in_key():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert core.flatten_dict(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert core.flatten_dict(nested, sep=".") == {"a.b": 1, "a.c.d": 2, "e": 3}
    with pytest.raises(ValueError):
        core.flatten_dict({"a/b": 1})


def test_stack_dicts_pads_with_minus_one():
    out = core.stack_dicts([{"x": jnp.array([1.0, 2.0, 3.0])}, {"x": np.array([[4.0]])}])
    np.testing.assert_array_equal(out["x"], [[1, 2, 3], [4, -1, -1]])


def test_stats_to_np_and_convert_to_scalar():
    stats = {"a": jnp.array([1.0, 2.0], jnp.bfloat16), "b": np.float32(3.0), "c": "text", "d": jnp.array(4.0)}
    out = core.stats_to_np(stats)
    assert isinstance(out["a"], np.ndarray) and out["a"].dtype == np.float32
    assert isinstance(out["b"], float) and out["c"] == "text" and isinstance(out["d"], np.ndarray)
    scalars = core.convert_to_scalar({"x": np.array([5.0]), "y": jnp.array(6.0), "z": np.ones(2)})
    assert scalars["x"] == 5.0 and scalars["y"] == 6.0 and isinstance(scalars["z"], np.ndarray)


# ---------------------------------------------------------------------------
# RunningMoments
# ---------------------------------------------------------------------------


def test_running_moments_init_matches_trl():
    state = core.running_moments_init()
    assert (float(state.mean), float(state.std), float(state.var)) == (0.0, 1.0, 1.0)
    assert float(state.count) == pytest.approx(1e-24, rel=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state))


def test_running_moments_several_updates_match_reference(rng):
    ref = RefRunningMoments()
    state = core.running_moments_init()
    update = jax.jit(core.running_moments_update)
    for size, loc, scale in [(8, 1.0, 2.0), (5, -3.0, 0.5), (16, 0.0, 1.0), (3, 10.0, 4.0)]:
        xs = rng.normal(loc, scale, size=size).astype(np.float32)
        state, mean, std = update(state, xs)
        ref_mean, ref_std = ref.update(t(xs))
        close(mean, ref_mean)
        close(std, ref_std)
        close(state.mean, ref.mean)
        close(state.var, ref.var)
        close(state.std, ref.std)
        close(state.count, ref.count)


def test_running_moments_matches_whole_stream_statistics(rng):
    chunks = [rng.normal(size=n).astype(np.float32) for n in (4, 7, 9)]
    state = core.running_moments_init()
    for xs in chunks:
        state, _, _ = core.running_moments_update(state, xs)
    stream = np.concatenate(chunks).astype(np.float64)
    close(state.mean, stream.mean(), atol=1e-5)
    close(state.var, stream.var(), atol=1e-5)
    close(state.std, stream.std(ddof=1), atol=1e-5)


def test_running_moments_in_scan(rng):
    batches = rng.normal(size=(5, 6)).astype(np.float32)

    def body(state, xs):
        state, mean, std = core.running_moments_update(state, xs)
        return state, (mean, std)

    final, (means, stds) = jax.jit(lambda b: jax.lax.scan(body, core.running_moments_init(), b))(batches)
    close(means, batches.mean(axis=1))
    close(stds, batches.std(axis=1, ddof=1), atol=1e-5)
    close(final.mean, batches.mean(), atol=1e-5)


# ---------------------------------------------------------------------------
# LengthSampler
# ---------------------------------------------------------------------------


def test_length_sampler_max_is_exclusive():
    sampler = core.LengthSampler(2, 5, rng=0)
    draws = {sampler() for _ in range(200)}
    assert draws == {2, 3, 4}
    assert all(isinstance(x, int) for x in draws)


def test_length_sampler_reproducible_with_seed_or_generator():
    s1, s2 = core.LengthSampler(2, 8, rng=123), core.LengthSampler(2, 8, rng=np.random.default_rng(123))
    draws = [s1() for _ in range(20)]
    assert draws == [s2() for _ in range(20)]
    assert set(draws) <= set(range(2, 8))


def test_length_sampler_default_uses_global_numpy_state_like_trl():
    np.random.seed(7)
    expected = [int(np.random.choice(list(range(2, 8)))) for _ in range(10)]
    np.random.seed(7)
    sampler = core.LengthSampler(2, 8)
    assert [sampler() for _ in range(10)] == expected


def test_length_sampler_empty_range_raises():
    with pytest.raises(ValueError):
        core.LengthSampler(3, 3)


# ---------------------------------------------------------------------------
# jit compatibility of every array function
# ---------------------------------------------------------------------------


def test_all_array_functions_jit(rng):
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(2, 4))
    values = rng.normal(size=(2, 4)).astype(np.float32)
    mask = random_mask(rng, (2, 4))
    pairs = [
        (core.logprobs_from_logits, (logits, labels)),
        (core.entropy_from_logits, (logits,)),
        (core.whiten, (values,)),
        (core.masked_mean, (values, mask)),
        (core.masked_var, (values, mask)),
        (core.masked_whiten, (values, mask)),
        (core.clip_by_value, (values, values - 0.1, values + 0.1)),
    ]
    for fn, args in pairs:
        close(jax.jit(fn)(*args), fn(*args))
