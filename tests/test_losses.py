"""rljax.losses vs float64 torch transcriptions of TRL 0.7.11's loss formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rljax import losses

RTOL, ATOL = 1e-5, 1e-6  # float32 (ours) vs float64 (reference)


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------
# Reference implementations (TRL 0.7.11 formulas, torch float64)
# ---------------------------------------------------------------------------


def ref_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def ref_masked_var(values, mask):
    mean = ref_masked_mean(values, mask)
    var = ref_masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1)


def ref_entropy_from_logits(logits):
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def ref_ppo_loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns,
                 cliprange, cliprange_value, vf_coef, ratio_threshold):
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * ref_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = ref_masked_mean(torch.gt(vf_losses2, vf_losses1).double(), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = ref_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = ref_masked_mean(torch.gt(pg_losses2, pg_losses).double(), mask)
    loss = pg_loss + vf_coef * vf_loss
    if ref_masked_mean(ratio, mask).item() > ratio_threshold:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
    stats = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "loss/total": loss,
        "policy/entropy": ref_masked_mean(ref_entropy_from_logits(logits), mask),
        "policy/approxkl": 0.5 * ref_masked_mean((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": ref_masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac,
        "policy/advantages": advantages,
        "policy/advantages_mean": ref_masked_mean(advantages, mask),
        "policy/ratio": ratio,
        "returns/mean": ref_masked_mean(returns, mask),
        "returns/var": ref_masked_var(returns, mask),
        "val/vpred": ref_masked_mean(vpreds, mask),
        "val/error": ref_masked_mean((vpreds - returns) ** 2, mask),
        "val/clipfrac": vf_clipfrac,
        "val/mean": ref_masked_mean(values, mask),
        "val/var": ref_masked_var(values, mask),
    }
    return pg_loss, vf_coef * vf_loss, stats


def ref_dpo_loss(pc, pr, rc, rr, beta, label_smoothing, loss_type, reference_free):
    pi_logratios = pc - pr
    ref_logratios = torch.tensor([0.0], dtype=pc.dtype) if reference_free else rc - rr
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_kl = (pc - rc).mean().clamp(min=0)
        rejected_kl = (pr - rr).mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(beta * ((pc - rc) - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - (pr - rr)))), 0)
    return losses, beta * (pc - rc), beta * (pr - rr)


def ref_get_batch_logps(logits, labels, average_log_prob=False, label_pad_token_id=-100):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token * loss_mask).sum(-1)


def ref_trl_reward_loss_broadcast(rc_b1, rr_b1, margin_b):
    """TRL 0.7.11 RewardTrainer.compute_loss: [B,1] rewards minus a [B] margin -> [B,B]."""
    return -F.logsigmoid(rc_b1 - rr_b1 - margin_b).mean()


# ---------------------------------------------------------------------------
# get_batch_logps / sft_loss
# ---------------------------------------------------------------------------


def make_lm_batch(rng, batch=3, seq=6, vocab=10, pad=-100):
    logits = (rng.normal(size=(batch, seq, vocab)) * 2).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, seq))
    labels[:, :2] = pad  # prompt
    labels[0, -2:] = pad  # right padding
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_get_batch_logps_matches_reference(rng, average):
    logits, labels = make_lm_batch(rng)
    expected = ref_get_batch_logps(t(logits), torch.tensor(labels), average)
    close(losses.get_batch_logps(logits, labels, average_log_prob=average), expected)
    jitted = jax.jit(losses.get_batch_logps, static_argnames=("average_log_prob",))
    close(jitted(logits, labels, average_log_prob=average), expected)


def test_get_batch_logps_custom_pad_id(rng):
    logits, labels = make_lm_batch(rng, pad=-1)
    expected = ref_get_batch_logps(t(logits), torch.tensor(labels), False, label_pad_token_id=-1)
    close(losses.get_batch_logps(logits, labels, label_pad_token_id=-1), expected)


def test_get_batch_logps_shape_mismatch_raises(rng):
    logits, labels = make_lm_batch(rng)
    with pytest.raises(ValueError, match="same shape"):
        losses.get_batch_logps(logits, labels[:, :-1])


def test_sft_loss_matches_torch_cross_entropy_on_shifted_labels(rng):
    logits, labels = make_lm_batch(rng, batch=4, seq=7, vocab=13)
    tl, tlab = t(logits), torch.tensor(labels)
    expected = F.cross_entropy(tl[:, :-1].reshape(-1, 13), tlab[:, 1:].reshape(-1), ignore_index=-100)
    close(losses.sft_loss(logits, labels), expected)
    loss, count = jax.jit(losses.sft_loss_and_count)(logits, labels)
    close(loss, expected)
    assert int(count) == int((labels[:, 1:] != -100).sum())


def test_sft_loss_all_ignored_is_zero_with_finite_grads(rng):
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = np.full((2, 4), -100)
    assert float(losses.sft_loss(logits, labels)) == 0.0
    grads = jax.grad(losses.sft_loss)(jnp.asarray(logits), labels)
    assert all_finite(grads) and float(jnp.abs(grads).sum()) == 0.0


def test_sft_loss_grad_is_softmax_minus_onehot(rng):
    logits, labels = make_lm_batch(rng, batch=2, seq=5, vocab=7)
    tl = t(logits).requires_grad_(True)
    F.cross_entropy(tl[:, :-1].reshape(-1, 7), torch.tensor(labels)[:, 1:].reshape(-1), ignore_index=-100).backward()
    close(jax.jit(jax.grad(losses.sft_loss))(jnp.asarray(logits), labels), tl.grad)


# ---------------------------------------------------------------------------
# reward_loss
# ---------------------------------------------------------------------------


def test_reward_loss_without_margin(rng):
    rc, rr = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    expected = -F.logsigmoid(t(rc) - t(rr)).mean()
    close(losses.reward_loss(rc, rr), expected)
    close(losses.reward_loss(rc[:, None], rr[:, None]), expected)  # reward-head shape [B, 1]
    close(jax.jit(losses.reward_loss)(rc, rr), expected)


def test_reward_loss_margin_is_per_pair(rng):
    rc, rr, m = (rng.normal(size=5).astype(np.float32) for _ in range(3))
    expected = -F.logsigmoid(t(rc) - t(rr) - t(m)).mean()
    close(losses.reward_loss(rc, rr, m), expected)
    close(losses.reward_loss(rc[:, None], rr[:, None], m), expected)
    close(losses.reward_loss(rc[:, None], rr[:, None], m[:, None]), expected)
    close(jax.jit(losses.reward_loss)(rc, rr, m), expected)
    close(losses.reward_loss(rc, rr, 0.5), -F.logsigmoid(t(rc) - t(rr) - 0.5).mean())


def test_reward_loss_margin_differs_from_trl_broadcast_for_batch_above_one(rng):
    rc, rr, m = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    trl = ref_trl_reward_loss_broadcast(t(rc)[:, None], t(rr)[:, None], t(m))
    ours = float(losses.reward_loss(rc[:, None], rr[:, None], m))
    assert abs(ours - trl.item()) > 1e-3


def test_reward_loss_margin_equals_trl_for_batch_of_one():
    rc, rr, m = np.array([[1.3]], np.float32), np.array([[0.2]], np.float32), np.array([0.4], np.float32)
    close(losses.reward_loss(rc, rr, m), ref_trl_reward_loss_broadcast(t(rc), t(rr), t(m)))


def test_reward_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        losses.reward_loss(np.zeros((3, 2)), np.zeros((3, 2)))


def test_reward_loss_grads_finite(rng):
    rc, rr = jnp.asarray(rng.normal(size=4) * 50, jnp.float32), jnp.asarray(rng.normal(size=4), jnp.float32)
    assert all_finite(jax.grad(losses.reward_loss, argnums=(0, 1))(rc, rr))


# ---------------------------------------------------------------------------
# dpo_loss
# ---------------------------------------------------------------------------


def dpo_inputs(rng, batch=5):
    return tuple((rng.normal(size=batch) * 3 - 20).astype(np.float32) for _ in range(4))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "kto_pair"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_loss_matches_reference(rng, loss_type, reference_free):
    inputs = dpo_inputs(rng)
    beta = 0.3
    got = losses.dpo_loss(*inputs, beta=beta, loss_type=loss_type, reference_free=reference_free)
    expected = ref_dpo_loss(*map(t, inputs), beta, 0.0, loss_type, reference_free)
    for g, e in zip(got, expected):
        close(g, e)
    assert got[0].shape == ((10,) if loss_type == "kto_pair" else (5,))
    jitted = jax.jit(functools.partial(losses.dpo_loss, loss_type=loss_type, reference_free=reference_free))
    for g, e in zip(jitted(*inputs, beta=beta), expected):
        close(g, e)


@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_sigmoid_label_smoothing(rng, reference_free):
    inputs = dpo_inputs(rng)
    got = losses.dpo_loss(*inputs, beta=0.1, label_smoothing=0.2, reference_free=reference_free)
    expected = ref_dpo_loss(*map(t, inputs), 0.1, 0.2, "sigmoid", reference_free)
    close(got[0], expected[0])
    close(jax.jit(losses.dpo_loss)(*inputs, label_smoothing=0.2, beta=0.1)[0],
          ref_dpo_loss(*map(t, inputs), 0.1, 0.2, "sigmoid", False)[0])


def test_dpo_label_smoothing_ignored_for_non_sigmoid(rng):
    inputs = dpo_inputs(rng)
    with pytest.warns(UserWarning, match="label_smoothing"):
        got = losses.dpo_loss(*inputs, label_smoothing=0.3, loss_type="hinge")
    close(got[0], losses.dpo_loss(*inputs, loss_type="hinge")[0])


def test_dpo_rewards_use_reference_even_when_reference_free(rng):
    pc, pr, rc, rr = dpo_inputs(rng)
    _, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, reference_free=True)
    close(chosen, 0.5 * (t(pc) - t(rc)))
    close(rejected, 0.5 * (t(pr) - t(rr)))


def test_dpo_rewards_are_gradient_stopped(rng):
    inputs = tuple(map(jnp.asarray, dpo_inputs(rng)))

    def rewards_sum(pc):
        _, chosen, rejected = losses.dpo_loss(pc, *inputs[1:])
        return chosen.sum() + rejected.sum()

    assert float(jnp.abs(jax.grad(rewards_sum)(inputs[0])).sum()) == 0.0


def test_dpo_unknown_loss_type_lists_valid_ones(rng):
    with pytest.raises(ValueError, match="sigmoid.*hinge.*ipo.*kto_pair"):
        losses.dpo_loss(*dpo_inputs(rng), loss_type="robust")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "kto_pair"])
def test_dpo_grads_match_torch_and_are_finite(rng, loss_type):
    inputs = dpo_inputs(rng)

    def mean_loss(pc, pr):
        return losses.dpo_loss(pc, pr, *inputs[2:], loss_type=loss_type)[0].mean()

    grads = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))(jnp.asarray(inputs[0]), jnp.asarray(inputs[1]))
    assert all_finite(grads)
    pc, pr = t(inputs[0]).requires_grad_(True), t(inputs[1]).requires_grad_(True)
    ref_dpo_loss(pc, pr, t(inputs[2]), t(inputs[3]), 0.1, 0.0, loss_type, False)[0].mean().backward()
    close(grads[0], pc.grad)
    close(grads[1], pr.grad)


# ---------------------------------------------------------------------------
# ppo_loss
# ---------------------------------------------------------------------------

PPO_KW = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0)


def ppo_inputs(rng, batch=3, seq=6, vocab=7):
    old_logprobs = (rng.normal(size=(batch, seq)) * 0.5 - 2).astype(np.float32)
    logprobs = (old_logprobs + rng.normal(size=(batch, seq)) * 0.3).astype(np.float32)
    values = rng.normal(size=(batch, seq)).astype(np.float32)
    vpreds = (values + rng.normal(size=(batch, seq)) * 0.4).astype(np.float32)
    logits = rng.normal(size=(batch, seq, vocab)).astype(np.float32)
    mask = (rng.random((batch, seq)) > 0.35).astype(np.float32)
    mask[:, 0] = 0.0  # query position
    mask[:, 1] = 1.0
    advantages = rng.normal(size=(batch, seq)).astype(np.float32)
    returns = (values + rng.normal(size=(batch, seq))).astype(np.float32)
    return dict(old_logprobs=old_logprobs, values=values, logits=logits, vpreds=vpreds,
                logprobs=logprobs, mask=mask, advantages=advantages, returns=returns)


def check_ppo_against_reference(inputs, **kw):
    pg, vf, stats = jax.jit(functools.partial(losses.ppo_loss, **kw))(**inputs)
    ref_pg, ref_vf, ref_stats = ref_ppo_loss(*(t(inputs[k]) for k in inputs), **kw)
    close(pg, ref_pg)
    close(vf, ref_vf)
    assert set(stats) == set(ref_stats) | {"skipped"}
    for key, value in ref_stats.items():
        close(stats[key], value, atol=1e-5)
    return pg, vf, stats


def test_ppo_loss_matches_reference_stats(rng):
    _, _, stats = check_ppo_against_reference(ppo_inputs(rng), **PPO_KW)
    assert float(stats["skipped"]) == 0.0
    assert stats["policy/advantages"].shape == (3, 6) and stats["policy/ratio"].shape == (3, 6)


def test_ppo_loss_takes_a_precomputed_entropy_instead_of_logits(rng):
    """``entropy=`` (from ``rljax.core.logprobs_and_entropy``) replaces the logits: same stats."""
    from rljax.core import entropy_from_logits

    inputs = ppo_inputs(rng)
    want = losses.ppo_loss(**inputs, **PPO_KW)
    entropy = entropy_from_logits(inputs["logits"])
    got = jax.jit(functools.partial(losses.ppo_loss, **PPO_KW))(**{**inputs, "logits": None}, entropy=entropy)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        close(a, b, atol=1e-6)


def test_ppo_loss_with_clipping_active(rng):
    inputs = ppo_inputs(rng)
    inputs["logprobs"] = inputs["old_logprobs"] + rng.normal(size=(3, 6)).astype(np.float32)
    inputs["vpreds"] = inputs["values"] + rng.normal(size=(3, 6)).astype(np.float32) * 2
    _, _, stats = check_ppo_against_reference(inputs, **PPO_KW)
    assert 0.0 < float(stats["policy/clipfrac"]) < 1.0
    assert 0.0 < float(stats["val/clipfrac"]) < 1.0


def test_ppo_loss_value_stat_is_unscaled(rng):
    _, vf, stats = losses.ppo_loss(**ppo_inputs(rng), **PPO_KW)
    close(vf, 0.1 * stats["loss/value"])
    close(stats["loss/total"], stats["loss/policy"] + 0.1 * stats["loss/value"])


def test_ppo_loss_ratio_threshold_skips_batch(rng):
    inputs = ppo_inputs(rng)
    inputs["logprobs"] = inputs["old_logprobs"] + 3.0  # ratio ~ e^3 = 20 > 10
    pg, vf, stats = check_ppo_against_reference(inputs, **PPO_KW)
    assert float(pg) == 0.0 and float(vf) == 0.0 and float(stats["loss/total"]) == 0.0
    assert float(stats["skipped"]) == 1.0
    assert float(stats["policy/approxkl"]) > 0  # other stats still reported
    # the same batch under a higher threshold is not skipped
    _, _, stats = losses.ppo_loss(**inputs, **{**PPO_KW, "ratio_threshold": 100.0})
    assert float(stats["skipped"]) == 0.0 and float(stats["loss/total"]) != 0.0


def test_ppo_loss_overflowing_ratio_gives_zero_not_nan(rng):
    inputs = ppo_inputs(rng)
    inputs["logprobs"] = inputs["old_logprobs"] + 200.0  # exp overflows to inf in float32
    pg, vf, stats = losses.ppo_loss(**inputs, **PPO_KW)
    assert float(pg) == 0.0 and float(vf) == 0.0 and float(stats["skipped"]) == 1.0


@pytest.mark.parametrize("shift", [3.0, 200.0])
def test_ppo_loss_skipped_batch_has_exactly_zero_finite_grads(rng, shift):
    inputs = ppo_inputs(rng)

    def total(logprobs, vpreds):
        pg, vf, _ = losses.ppo_loss(**{**inputs, "logprobs": logprobs, "vpreds": vpreds}, **PPO_KW)
        return pg + vf

    logprobs = jnp.asarray(inputs["old_logprobs"] + shift)
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(logprobs, jnp.asarray(inputs["vpreds"]))
    assert all_finite(grads)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in grads)


def test_ppo_loss_is_invariant_to_removing_masked_positions(rng):
    """TRL's test_loss_trainer property: masked positions do not affect the loss."""
    batch, keep = 2, 4
    inputs = ppo_inputs(rng, batch=batch, seq=7)
    mask = np.zeros((batch, 7), np.float32)
    mask[0, [1, 2, 4, 6]] = 1.0
    mask[1, [0, 3, 4, 5]] = 1.0
    inputs["mask"] = mask
    idx = np.stack([np.flatnonzero(row) for row in mask])
    compact = {k: np.take_along_axis(v, idx if v.ndim == 2 else idx[..., None], axis=1) for k, v in inputs.items()}
    assert compact["mask"].shape == (batch, keep) and compact["mask"].all()
    pg, vf, stats = losses.ppo_loss(**inputs, **PPO_KW)
    pg_c, vf_c, stats_c = losses.ppo_loss(**compact, **PPO_KW)
    close(pg, pg_c)
    close(vf, vf_c)
    for key in stats:
        if key not in ("policy/advantages", "policy/ratio"):
            close(stats[key], stats_c[key], atol=1e-5)


def test_ppo_loss_grads_finite_and_match_torch(rng):
    inputs = ppo_inputs(rng)

    def total(logprobs, vpreds):
        pg, vf, _ = losses.ppo_loss(**{**inputs, "logprobs": logprobs, "vpreds": vpreds}, **PPO_KW)
        return pg + vf

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(inputs["logprobs"]), jnp.asarray(inputs["vpreds"]))
    assert all_finite(grads)
    tin = {k: t(v) for k, v in inputs.items()}
    tin["logprobs"].requires_grad_(True)
    tin["vpreds"].requires_grad_(True)
    pg, vf, _ = ref_ppo_loss(*tin.values(), **PPO_KW)
    (pg + vf).backward()
    close(grads[0], tin["logprobs"].grad)
    close(grads[1], tin["vpreds"].grad)


def test_ppo_loss_grad_does_not_flow_through_stats(rng):
    inputs = ppo_inputs(rng)

    def entropy_stat(logits):
        return losses.ppo_loss(**{**inputs, "logits": logits}, **PPO_KW)[2]["policy/entropy"]

    assert float(jnp.abs(jax.grad(entropy_stat)(jnp.asarray(inputs["logits"]))).sum()) == 0.0


@pytest.mark.parametrize("n_tokens", [0, 1])
def test_ppo_loss_degenerate_masks_stay_finite_under_jit(rng, n_tokens):
    inputs = ppo_inputs(rng)
    mask = np.zeros_like(inputs["mask"])
    mask[1, 2] = float(n_tokens)
    inputs["mask"] = mask
    fn = jax.jit(functools.partial(losses.ppo_loss, **PPO_KW))
    out = fn(**inputs)
    assert all_finite(out)
    assert float(out[2]["returns/var"]) == 0.0 and float(out[2]["val/var"]) == 0.0

    def total(logprobs):
        pg, vf, _ = losses.ppo_loss(**{**inputs, "logprobs": logprobs}, **PPO_KW)
        return pg + vf

    assert all_finite(jax.jit(jax.grad(total))(jnp.asarray(inputs["logprobs"])))


def test_ppo_loss_eager_single_token_mask_does_not_raise(rng):
    inputs = ppo_inputs(rng)
    inputs["mask"] = np.zeros_like(inputs["mask"])
    inputs["mask"][0, 3] = 1.0
    assert all_finite(losses.ppo_loss(**inputs, **PPO_KW))


def test_ppo_loss_shape_checks(rng):
    inputs = ppo_inputs(rng)
    inputs["vpreds"] = inputs["vpreds"][:, :-1]
    with pytest.raises(AssertionError):
        losses.ppo_loss(**inputs, **PPO_KW)


def test_ppo_loss_traced_hyperparameters(rng):
    inputs = ppo_inputs(rng)

    @jax.jit
    def run(cliprange, vf_coef):
        return losses.ppo_loss(**inputs, cliprange=cliprange, cliprange_value=0.2, vf_coef=vf_coef)

    pg, vf, _ = run(jnp.float32(0.2), jnp.float32(0.1))
    ref_pg, ref_vf, _ = ref_ppo_loss(*(t(v) for v in inputs.values()), **PPO_KW)
    close(pg, ref_pg)
    close(vf, ref_vf)
