"""rljax.ppo against float64 torch transcriptions of TRL 0.7.11's PPO math.

The `_trl_*` helpers below restate TRL 0.7.11's formulas (per-row Python
loops where TRL loops) in torch float64; rljax runs in float32, hence the
tolerances.
"""
import dataclasses
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rljax import core
from rljax import ppo
from rljax.ppo import (
    AdaptiveKLController,
    FixedKLController,
    KLControllerState,
    PPOConfig,
    adaptive_kl_update,
    compute_advantages,
    compute_rewards,
    fixed_kl_update,
    kl_controller_init,
    kl_controller_update,
    kl_penalty,
    process_scores,
    step_stats,
    validate_scores,
)

RTOL, ATOL = 1e-5, 1e-5


# --------------------------------------------------------------------------
# float64 torch transcriptions of TRL 0.7.11
# --------------------------------------------------------------------------


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def _trl_kl_penalty(logprob, ref_logprob, mode):
    if mode == "kl":
        return logprob - ref_logprob
    if mode == "abs":
        return (logprob - ref_logprob).abs()
    if mode == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if mode == "full":
        return F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)
    raise NotImplementedError


def _trl_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef, mode):
    rewards, non_score_rewards, kls = [], [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = _trl_kl_penalty(logprob, ref_logprob, mode)
        kls.append(kl)
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)


def _trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def _trl_masked_var(values, mask, unbiased=True):
    mean = _trl_masked_mean(values, mask)
    variance = _trl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def _trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = _trl_masked_whiten(rewards, mask, shift_mean=False)
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, mask)
    return values, advantages, returns


class _TrlRunningMoments:
    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var = (old_sum + new_sum) / tot_count
        self.std = (self.var * tot_count / (tot_count - 1)).sqrt()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).sqrt().item()


def _trl_process_scores(scores, running, use_score_scaling, use_score_norm, score_clip):
    if use_score_scaling:
        running.update(scores)
        factor = running.std + torch.finfo(torch.float32).eps
        if use_score_norm:
            scores = (scores - running.mean) / factor
        else:
            scores = scores / factor
    if score_clip is not None:
        scores = torch.clip(scores, -score_clip, score_clip)
    return scores


class _TrlAdaptiveKL:
    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

# Padded masks: right padding, leading zeros (query positions), an interior
# zero then a final token (response_masks), and a one-token response.
MASKS = np.array(
    [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ],
    dtype=np.float32,
)
B, T, V = MASKS.shape[0], MASKS.shape[1], 5


def _random_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    ref_logits = (logits + 0.3 * rng.normal(size=(B, T, V))).astype(np.float32)
    full_lp = np.asarray(jax.nn.log_softmax(logits, -1))
    full_ref = np.asarray(jax.nn.log_softmax(ref_logits, -1))
    tokens = rng.integers(0, V, size=(B, T))
    lp = np.take_along_axis(full_lp, tokens[..., None], -1)[..., 0]
    ref = np.take_along_axis(full_ref, tokens[..., None], -1)[..., 0]
    scores = rng.normal(size=(B,)).astype(np.float32) * 2
    return dict(logits=logits, ref_logits=ref_logits, full_lp=full_lp, full_ref=full_ref,
                lp=lp, ref=ref, scores=scores)


# --------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------


def test_kl_penalty_fixed_cases_match_trl_test_values():
    lp = jnp.array([[0.5, 0.2, 0.1], [0.6, 0.2, 0.1]])
    ref = jnp.array([[0.4, 0.3, 0.0], [0.7, 0.1, 0.3]])
    np.testing.assert_allclose(kl_penalty(lp, ref, "kl"), [[0.1, -0.1, 0.1], [-0.1, 0.1, -0.2]], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(lp, ref, "abs"), [[0.1, 0.1, 0.1], [0.1, 0.1, 0.2]], atol=1e-6)
    np.testing.assert_allclose(
        kl_penalty(lp, ref, "mse"), [[0.005, 0.005, 0.005], [0.005, 0.005, 0.02]], atol=1e-6
    )
    p = jnp.array([[[0.1, 0.2, 0.7], [0.3, 0.4, 0.3]], [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3]]])
    q = jnp.array([[[0.2, 0.2, 0.6], [0.3, 0.4, 0.3]], [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3]]])
    expected = 0.1 * math.log(0.1 / 0.2) + 0.7 * math.log(0.7 / 0.6)
    np.testing.assert_allclose(
        kl_penalty(jnp.log(p), jnp.log(q), "full"), [[expected, 0.0], [0.0, 0.0]], atol=1e-6
    )


def test_kl_penalty_full_ignores_zero_probability_tokens():
    lp = jnp.log(jnp.array([[[0.0, 0.5, 0.5]]]))
    ref = jnp.log(jnp.array([[[0.2, 0.4, 0.4]]]))
    out = kl_penalty(lp, ref, "full")
    np.testing.assert_allclose(out, [[math.log(0.5 / 0.4)]], rtol=1e-6)


def test_kl_penalty_rejects_unknown_mode():
    with pytest.raises(ValueError, match="kl_penalty must be one of"):
        kl_penalty(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "l2")


# --------------------------------------------------------------------------
# compute_rewards
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kl", "abs", "mse", "full"])
def test_compute_rewards_matches_trl(mode):
    d = _random_inputs()
    kl_coef = 0.17
    if mode == "full":
        lp, ref, t_lp, t_ref = d["full_lp"], d["full_ref"], _t(d["full_lp"]), _t(d["full_ref"])
    else:
        lp, ref, t_lp, t_ref = d["lp"], d["ref"], _t(d["lp"]), _t(d["ref"])
    got = compute_rewards(d["scores"], lp, ref, MASKS, kl_coef, kl_penalty=mode)
    want = _trl_compute_rewards(_t(d["scores"]), t_lp, t_ref, _t(MASKS), kl_coef, mode)
    for g, w in zip(got, want):
        chex.assert_shape(g, (B, T))
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=RTOL, atol=ATOL)


def test_compute_rewards_penalises_every_position_and_scores_last_mask_token():
    d = _random_inputs()
    rewards, non_score, kls = compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, 0.5)
    np.testing.assert_allclose(non_score, -0.5 * (d["lp"] - d["ref"]), rtol=1e-6, atol=1e-7)
    last = [4, 6, 4, 7]
    diff = np.asarray(rewards - non_score)
    for b in range(B):
        expected = np.zeros(T, np.float32)
        expected[last[b]] = d["scores"][b]
        np.testing.assert_allclose(diff[b], expected, atol=1e-6)


def test_compute_rewards_full_from_logits_equals_full_from_logprobs():
    d = _random_inputs()
    from_lp = compute_rewards(d["scores"], d["full_lp"], d["full_ref"], MASKS, 0.1, "full")
    from_logits = compute_rewards(
        d["scores"], d["lp"], d["ref"], MASKS, 0.1, "full", logits=d["logits"], ref_logits=d["ref_logits"]
    )
    for a, b in zip(from_lp, from_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compute_rewards_full_needs_distributions():
    d = _random_inputs()
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, 0.1, "full")
    with pytest.raises(ValueError, match="both"):
        compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, 0.1, "full", logits=d["logits"])


def test_compute_rewards_all_zero_mask_row_gets_no_score():
    masks = MASKS.copy()
    masks[1] = 0
    d = _random_inputs()
    rewards, non_score, _ = compute_rewards(d["scores"], d["lp"], d["ref"], masks, 0.2)
    np.testing.assert_array_equal(rewards[1], non_score[1])


def test_compute_rewards_jits_with_traced_kl_coef():
    d = _random_inputs()
    for mode in ("kl", "abs", "mse"):
        f = jax.jit(compute_rewards, static_argnames="kl_penalty")
        got = f(d["scores"], d["lp"], d["ref"], MASKS, jnp.float32(0.3), kl_penalty=mode)
        want = compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, 0.3, kl_penalty=mode)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    f = jax.jit(compute_rewards, static_argnames="kl_penalty")
    got = f(d["scores"], d["full_lp"], d["full_ref"], MASKS, 0.3, kl_penalty="full")
    want = compute_rewards(d["scores"], d["full_lp"], d["full_ref"], MASKS, 0.3, kl_penalty="full")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# compute_advantages
# --------------------------------------------------------------------------


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)])
def test_compute_advantages_matches_trl(gamma, lam, whiten_rewards):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(B, T)).astype(np.float32)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    got = compute_advantages(values, rewards, MASKS, gamma, lam, whiten_rewards=whiten_rewards)
    want = _trl_compute_advantages(_t(values), _t(rewards), _t(MASKS), gamma, lam, whiten_rewards)
    for g, w in zip(got, want):
        chex.assert_shape(g, (B, T))
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=1e-4, atol=1e-5)


def test_compute_advantages_runs_over_leading_masked_positions():
    # Quirk 3: the query positions before a response carry its discounted advantage.
    values = np.zeros((2, 4), np.float32)
    rewards = np.array([[5.0, 5.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]], np.float32)
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    _, _, returns = compute_advantages(values, rewards, mask, 1.0, 0.5)
    # masked rewards: [[0,0,0,1],[0,1,1,0]] -> advantages (= returns, values are 0)
    np.testing.assert_allclose(returns, [[0.125, 0.25, 0.5, 1.0], [0.75, 1.5, 1.0, 0.0]], atol=1e-6)


def test_compute_advantages_stops_gradients_and_jits():
    rng = np.random.default_rng(2)
    values = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    rewards = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)

    def total(v, r):
        _, adv, ret = compute_advantages(v, r, MASKS, 1.0, 0.95)
        return jnp.sum(adv) + jnp.sum(ret)

    grads = jax.grad(total, argnums=(0, 1))(values, rewards)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)

    f = jax.jit(compute_advantages, static_argnames="whiten_rewards")
    for whiten in (False, True):
        got = f(values, rewards, MASKS, jnp.float32(0.99), jnp.float32(0.9), whiten_rewards=whiten)
        want = compute_advantages(values, rewards, MASKS, 0.99, 0.9, whiten_rewards=whiten)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------

KL_TRAJECTORY = [0.5, 8.0, 20.0, -3.0, 6.0, 6.6, 5.5, 100.0]


def test_adaptive_kl_trajectory_matches_trl():
    n_steps, horizon = 256, 1000.0
    ref = _TrlAdaptiveKL(0.2, 6, horizon)
    value = jnp.float32(0.2)
    cfg = PPOConfig(batch_size=256, mini_batch_size=64, horizon=horizon, init_kl_coef=0.2)
    state = kl_controller_init(cfg)
    shell = AdaptiveKLController(0.2, 6, horizon)
    jitted = jax.jit(kl_controller_update)
    state_j = state
    for current in KL_TRAJECTORY:
        ref.update(current, n_steps)
        value = adaptive_kl_update(value, current, n_steps, 6.0, horizon)
        state = kl_controller_update(state, current, n_steps)
        state_j = jitted(state_j, jnp.float32(current), n_steps)
        shell.update(current, n_steps)
        for got in (value, state.value, state_j.value, shell.value):
            np.testing.assert_allclose(float(got), ref.value, rtol=1e-6)
    assert state.value.dtype == jnp.float32
    assert state.adaptive and state.target == 6.0 and state.horizon == horizon
    assert ref.value != 0.2


def test_fixed_kl_controller_is_a_noop():
    assert fixed_kl_update(0.3, 100.0, 256) == 0.3
    state = kl_controller_init(PPOConfig(adap_kl_ctrl=False, init_kl_coef=0.3))
    assert not state.adaptive
    shell = FixedKLController(0.3)
    for current in KL_TRAJECTORY:
        state = kl_controller_update(state, current, 128)
        shell.update(current, 128)
    np.testing.assert_allclose(float(state.value), 0.3, rtol=1e-7)
    np.testing.assert_allclose(shell.value, 0.3, rtol=1e-7)
    assert not isinstance(shell, AdaptiveKLController)


def test_kl_controller_state_is_a_pytree_with_static_settings():
    state = KLControllerState(value=jnp.float32(0.2), adaptive=True, target=6.0, horizon=1e4)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 1
    out = jax.lax.scan(lambda s, kl: (kl_controller_update(s, kl, 128), s.value), state, jnp.ones(3) * 12)
    assert out[0].target == 6.0 and out[1].shape == (3,)


# --------------------------------------------------------------------------
# process_scores
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling,norm,clip",
    [
        (True, False, None),
        (True, True, None),
        (True, True, 0.5),
        (False, False, 1.0),
        (False, False, None),
        (False, True, None),
    ],
)
def test_process_scores_matches_trl_running_moments(scaling, norm, clip):
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(6,)) * s + m).astype(np.float32) for s, m in [(3, 1), (1, -2), (0.5, 4), (2, 0)]]
    state = core.running_moments_init()
    running = _TrlRunningMoments()
    process = jax.jit(process_scores, static_argnames=("use_score_scaling", "use_score_norm", "score_clip"))
    for batch in batches:
        got, state = process(
            batch, state, use_score_scaling=scaling, use_score_norm=norm, score_clip=clip
        )
        want = _trl_process_scores(_t(batch), running, scaling, norm, clip)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
        assert got.dtype == jnp.float32
        if scaling:
            np.testing.assert_allclose(float(state.mean), float(running.mean), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(state.std), float(running.std), rtol=1e-5)
    if not scaling:
        assert float(state.count) == pytest.approx(1e-24)


def test_process_scores_eager_equals_jit_with_traced_clip():
    scores = jnp.array([-3.0, 0.2, 5.0])
    eager, _ = process_scores(scores, core.running_moments_init(), use_score_scaling=False,
                              use_score_norm=False, score_clip=1.0)
    traced = jax.jit(lambda s, c: process_scores(s, core.running_moments_init(), use_score_scaling=False,
                                                 use_score_norm=False, score_clip=c)[0])(scores, 1.0)
    np.testing.assert_allclose(eager, [-1.0, 0.2, 1.0], rtol=1e-7)
    np.testing.assert_allclose(traced, eager)


# --------------------------------------------------------------------------
# validate_scores
# --------------------------------------------------------------------------


def test_validate_scores_accepts_arrays_and_lists_of_scalars():
    np.testing.assert_array_equal(validate_scores(np.array([1.0, 2.0]), 2), [1.0, 2.0])
    out = validate_scores([torch.tensor(1.5), torch.tensor([2.5]), jnp.float32(3.0), 4], 4)
    assert out.dtype == np.float32 and out.shape == (4,)
    np.testing.assert_array_equal(out, [1.5, 2.5, 3.0, 4.0])
    np.testing.assert_array_equal(validate_scores(jnp.array([0.5]), 1), [0.5])


@pytest.mark.parametrize(
    "scores,match",
    [
        (np.ones(3), "batch_size is 2"),
        ([1.0, 2.0, 3.0], "batch_size is 2"),
        (np.ones((2, 1)), "1-D"),
        ([np.ones(2), np.ones(2)], r"scores\[0\] must be a scalar"),
        ([1.0, torch.ones(1, 1)], r"scores\[1\] must be a scalar"),
        (np.array([1.0, np.nan]), "finite"),
        ([1.0, float("inf")], "finite"),
        (np.array(["a", "b"]), "real numbers"),
    ],
)
def test_validate_scores_errors(scores, match):
    with pytest.raises(ValueError, match=match):
        validate_scores(scores, 2)


# --------------------------------------------------------------------------
# step_stats
# --------------------------------------------------------------------------


def test_step_stats_match_trl_record_step_stats():
    d = _random_inputs()
    kl_coef = 0.2
    rewards, non_score, kls = compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, kl_coef)
    q_len = np.array([3, 5, 2, 7])
    r_len = MASKS.sum(-1)
    train_stats = {"loss/policy": jnp.float32(0.1), "val/error": jnp.float32(0.5),
                   "returns/var": jnp.float32(2.0), "policy/ratio": jnp.ones((1, 10))}
    kwargs = dict(scores=d["scores"], logprobs=d["lp"], ref_logprobs=d["ref"], non_score_reward=non_score,
                  kls=kls, masks=MASKS, kl_coef=kl_coef, queries_len=q_len, responses_len=r_len,
                  train_stats=train_stats)
    got = step_stats(**kwargs)
    jitted = jax.jit(lambda kw: step_stats(**kw))(kwargs)

    mask, t_kls, t_lp = _t(MASKS), _t(kls), _t(d["lp"])
    kl_list = (t_kls * mask).sum(axis=-1)
    ql, rl = _t(q_len), _t(r_len)
    want = {
        "objective/kl": kl_list.mean(),
        "objective/kl_dist": kl_list,
        "objective/logprobs": t_lp,
        "objective/ref_logprobs": _t(d["ref"]),
        "objective/kl_coef": torch.tensor(kl_coef),
        "objective/entropy": (-t_lp * mask).sum(axis=-1).mean(),
        "ppo/mean_non_score_reward": _trl_masked_mean(_t(non_score), mask),
        "ppo/mean_scores": _t(d["scores"]).mean(),
        "ppo/std_scores": _t(d["scores"]).std(),
        "tokens/queries_len_mean": ql.mean(),
        "tokens/queries_len_std": ql.std(),
        "tokens/queries_dist": ql,
        "tokens/responses_len_mean": rl.mean(),
        "tokens/responses_len_std": rl.std(),
        "tokens/responses_dist": rl,
        "ppo/loss/policy": torch.tensor(0.1),
        "ppo/val/error": torch.tensor(0.5),
        "ppo/returns/var": torch.tensor(2.0),
        "ppo/policy/ratio": torch.ones((1, 10)),
        "ppo/val/var_explained": torch.tensor(1 - 0.5 / 2.0),
    }
    assert set(got) == set(want) == set(jitted)
    for key, w in want.items():
        np.testing.assert_allclose(np.asarray(got[key]), w.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(np.asarray(jitted[key]), w.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_step_stats_without_train_stats_has_no_ppo_loss_keys():
    d = _random_inputs()
    _, non_score, kls = compute_rewards(d["scores"], d["lp"], d["ref"], MASKS, 0.2)
    got = step_stats(scores=d["scores"], logprobs=d["lp"], ref_logprobs=d["ref"], non_score_reward=non_score,
                     kls=kls, masks=MASKS, kl_coef=0.2, queries_len=np.ones(B), responses_len=np.ones(B))
    assert "ppo/val/var_explained" not in got and "objective/kl" in got


# --------------------------------------------------------------------------
# PPOConfig
# --------------------------------------------------------------------------

TRL_DEFAULTS = dict(
    seed=0, log_with=None, task_name=None, model_name="gpt2", query_dataset="imdb",
    reward_model="sentiment-analysis:lvwerra/distilbert-imdb", remove_unused_columns=True,
    tracker_kwargs={}, accelerator_kwargs={}, project_kwargs={}, tracker_project_name="trl",
    push_to_hub_if_best_kwargs={}, steps=20000, learning_rate=1.41e-5, adap_kl_ctrl=True,
    init_kl_coef=0.2, kl_penalty="kl", target=6, horizon=10000, gamma=1, lam=0.95, cliprange=0.2,
    cliprange_value=0.2, vf_coef=0.1, batch_size=128, forward_batch_size=None, mini_batch_size=128,
    gradient_accumulation_steps=1, world_size=None, ppo_epochs=4, max_grad_norm=None,
    optimize_cuda_cache=None, optimize_device_cache=False, early_stopping=False, target_kl=1,
    compare_steps=1, ratio_threshold=10.0, use_score_scaling=False, use_score_norm=False,
    score_clip=None, whiten_rewards=False, is_encoder_decoder=None, is_peft_model=None,
    backward_batch_size=128, global_backward_batch_size=None, global_batch_size=None,
    total_ppo_epochs=157,
)


def test_ppo_config_defaults_equal_trl():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = PPOConfig()
    for key, value in TRL_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    field_names = {f.name for f in dataclasses.fields(PPOConfig)}
    assert field_names == set(TRL_DEFAULTS) - {"total_ppo_epochs"} | {"exp_name"}


def test_ppo_config_derived_sizes_and_to_dict():
    cfg = PPOConfig(batch_size=16, mini_batch_size=4, gradient_accumulation_steps=2, steps=100,
                    world_size=3, tracker_kwargs={"wandb": {"name": "run"}})
    assert cfg.backward_batch_size == 8
    assert cfg.global_backward_batch_size == 24 and cfg.global_batch_size == 48
    assert cfg.total_ppo_epochs == 7
    flat = cfg.to_dict()
    assert flat["tracker_kwargs/wandb/name"] == "run" and "tracker_kwargs" not in flat
    assert flat["total_ppo_epochs"] == 7 and flat["batch_size"] == 16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kl_penalty="l2"), "kl_penalty must be one of"),
        (dict(batch_size=10, mini_batch_size=4), r"multiple of `mini_batch_size \* gradient_accumulation_steps`"),
        (dict(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=3), "batch_size=6 or 12"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(mini_batch_size=-1), "mini_batch_size must be a positive integer"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive"),
        (dict(ppo_epochs=0), "ppo_epochs must be a positive"),
        (dict(steps=0), "steps must be a positive"),
        (dict(world_size=0), "world_size must be positive"),
        (dict(horizon=0), "horizon must be positive"),
    ],
)
def test_ppo_config_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def test_ppo_config_warnings():
    with pytest.warns(UserWarning, match="use_score_scaling=True"):
        PPOConfig(use_score_norm=True)
    with pytest.warns(FutureWarning, match="forward_batch_size"):
        cfg = PPOConfig(batch_size=8, mini_batch_size=8, forward_batch_size=2)
    assert cfg.mini_batch_size == 2 and cfg.backward_batch_size == 2
    with pytest.warns(FutureWarning, match="optimize_cuda_cache"):
        cfg = PPOConfig(optimize_cuda_cache=True)
    assert cfg.optimize_device_cache is False  # no effect, as in TRL 0.7.11


def test_ppo_config_is_tyro_friendly():
    import tyro

    cfg = tyro.cli(PPOConfig, args=["--batch-size", "8", "--mini-batch-size", "4", "--kl-penalty", "abs"])
    assert cfg.batch_size == 8 and cfg.backward_batch_size == 4 and cfg.kl_penalty == "abs"


def test_public_api_is_exported():
    for name in ppo.__all__:
        assert hasattr(ppo, name), name
