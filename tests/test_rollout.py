"""rljax.rollout: scoring responses (``response_logprobs``), PPO's rollout forward, the
reference-as-policy-params contract (PEFT) and chunked forwards.

Reference numbers: the full-sequence forward of the same module, sliced by hand."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _mesh_fixtures as F
from rljax.core import entropy_from_logits, logprobs_from_logits
from rljax.rollout import chunked_rows, make_forward_rollout, make_rollout, response_logprobs, sequence_inputs

B, P, N = 8, 6, 5


@functools.lru_cache(maxsize=None)
def _setup():
    module, params = F.tiny_value_model(seed=3, n_layer=1)
    ref_params = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    q, qm, r, rm = F.ppo_inputs(B, query_len=P, response_len=N, seed=5)
    return module, params, ref_params, (q, qm, r, rm)


def _full_forward(module, params, q, qm, r, rm):
    ids, am, pos, _ = sequence_inputs(q, qm, r, rm)
    return module.apply({"params": params}, ids, am, pos, deterministic=True)


@functools.lru_cache(maxsize=None)
def _scores_fn(chunk_size):
    module, *_ = _setup()
    return jax.jit(functools.partial(response_logprobs, module, return_values=True, return_entropy=True,
                                     chunk_size=chunk_size))


def test_response_logprobs_score_each_response_token_given_its_prefix():
    module, params, _, (q, qm, r, rm) = _setup()
    scores = _scores_fn(None)(params, q, qm, r, rm)
    out = _full_forward(module, params, q, qm, r, rm)
    window = out.logits[:, P - 1 : P + N - 1]
    for name, got, want in (
        ("logprobs", scores.logprobs, logprobs_from_logits(window, r)),
        ("values", scores.values, out.values[:, P - 1 : P + N - 1]),
        ("entropy", scores.entropy, entropy_from_logits(window)),
    ):
        assert got.shape == (B, N) and got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=name)


def test_response_logprobs_chunked_by_rows_equal_one_pass():
    _, params, _, args = _setup()
    one = _scores_fn(None)(params, *args)
    chunked = _scores_fn(2)(params, *args)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_chunked_rows_rejects_a_chunk_that_does_not_divide_the_batch():
    with pytest.raises(ValueError, match="chunk_size=3 must be a positive divisor of the batch size 8"):
        chunked_rows(lambda x: x, 3, jnp.zeros((8, 2)))


def test_rollout_matches_response_scores_and_ref_none_means_policy_params():
    """The Rollout's window equals ``response_logprobs``; ``ref_params=None`` is the policy's
    params under ``ref_module`` (PEFT's adapters-off reference), not an error."""
    module, params, ref_params, (q, qm, r, rm) = _setup()
    forward = jax.jit(make_forward_rollout(module))
    rollout = forward(params, ref_params, q, qm, r, rm)
    pol = _scores_fn(None)(params, q, qm, r, rm)
    ref = _scores_fn(None)(ref_params, q, qm, r, rm)
    for x in (rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.masks):
        assert x.shape == (B, N)  # the response window only, aligned with the responses
    np.testing.assert_array_equal(np.asarray(rollout.masks), np.asarray(rm))
    np.testing.assert_allclose(np.asarray(rollout.logprobs), np.asarray(pol.logprobs), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rollout.ref_logprobs), np.asarray(ref.logprobs), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rollout.values), np.asarray(pol.values), rtol=1e-6, atol=1e-6)
    chunked = jax.jit(make_forward_rollout(module, "full", chunk_size=2))(params, ref_params, q, qm, r, rm)
    for name in ("logprobs", "ref_logprobs", "values"):
        np.testing.assert_allclose(np.asarray(getattr(chunked, name)), np.asarray(getattr(rollout, name)),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert chunked.kls.shape == (B, N) and np.all(np.asarray(chunked.kls) >= -1e-6)  # exact KL of each position

    as_policy = forward(params, None, q, qm, r, rm)
    np.testing.assert_allclose(np.asarray(as_policy.ref_logprobs), np.asarray(as_policy.logprobs), atol=0)


def test_make_rollout_generates_then_scores():
    from rljax.generation import make_generate_fn
    from rljax.ppo_train import PPOTrainState

    module, params, _, (q, qm, _, _) = _setup()
    gen = make_generate_fn(module, max_new_tokens=N, do_sample=True, eos_token_id=2, pad_token_id=0, jit=False)
    state = PPOTrainState.create(params, None, F.ppo_config(batch_size=B, mini_batch_size=4))
    rollout = jax.jit(make_rollout(module, gen))(state, q, qm, jax.random.PRNGKey(0))
    assert rollout.responses.shape == (B, N) and rollout.logprobs.shape[0] == B
    np.testing.assert_allclose(np.asarray(rollout.ref_logprobs), np.asarray(rollout.logprobs), atol=0)


def test_response_logprobs_at_a_temperature_score_the_tempered_distribution():
    """``temperature=T``: log-probs and entropy of ``softmax(logits / T)`` gathered at the
    response tokens (later TRL's GRPO/RLOO); T = 1 is the untouched default (PPO)."""
    module, params, _, (q, qm, r, rm) = _setup()
    window = _full_forward(module, params, q, qm, r, rm).logits[:, P - 1 : P + N - 1]
    T = 0.7
    scores = jax.jit(functools.partial(response_logprobs, module, return_entropy=True, temperature=T))
    got = scores(params, q, qm, r, rm)
    want = jnp.take_along_axis(jax.nn.log_softmax(window / T, axis=-1), r[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.entropy), np.asarray(entropy_from_logits(window / T)), rtol=1e-5,
                               atol=1e-5)
    plain = _scores_fn(None)(params, q, qm, r, rm)
    assert not np.allclose(np.asarray(got.logprobs), np.asarray(plain.logprobs), atol=1e-3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        response_logprobs(module, params, q, qm, r, rm, temperature=0.0)


def test_the_sampling_temperature_of_a_generate_fn_is_read_and_checked():
    from rljax.generation import make_generate_fn
    from rljax.rollout import check_temperature, generation_temperature

    module, *_ = _setup()
    for jit in (False, True):
        gen = make_generate_fn(module, max_new_tokens=N, do_sample=True, temperature=0.5, jit=jit)
        assert generation_temperature(gen) == 0.5
        check_temperature(gen, 0.5, "GRPOSettings")
        with pytest.raises(ValueError, match=r"temperature=0.5 but GRPOSettings.temperature=1.0"):
            check_temperature(gen, 1.0, "GRPOSettings")
    greedy = make_generate_fn(module, max_new_tokens=N, do_sample=False, jit=False)
    assert generation_temperature(greedy) is None and generation_temperature(lambda *a: None) is None
