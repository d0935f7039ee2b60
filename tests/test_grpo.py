"""rljax.grpo: the advantage and loss math against later TRL's ``GRPOTrainer`` (v0.21,
``_generate_and_score_completions`` and ``_compute_loss`` restated in torch below), the corner
cases (a group with equal rewards, all-truncated completions, ``beta = 0`` running no
reference forward), and one compiled ``make_train`` shared by the "learns" and "equal rewards"
checks. The ``GRPOTrainer`` shell (Python rewards on texts, TRL's log keys, checkpoints and
resuming) is tested through ``rljax grpo`` in tests/test_cli_grpo.py.

The torch helpers transcribe TRL's formulas (the paper's: group-normalised rewards, the
clipped surrogate, the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1``).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from rljax.generation import make_generate_fn
from rljax.grpo import (
    GRPOBatch,
    GRPOSettings,
    GRPOTrainState,
    combine_rewards,
    group_advantages,
    grpo_loss,
    is_truncated,
    make_grpo_rollout,
    make_train,
)
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config

VOCAB, PAD, EOS = 32, 0, 2
# Tiny programs, many compiles: XLA's backend optimisations cost more CPU time than they save here
# (compile 5.6 -> 3.9 s for a GRPO make_train on 2 cores). Same options on both sides of every comparison.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------------------------
# TRL's formulas in torch (v0.21 grpo_trainer.py)
# --------------------------------------------------------------------------------------------


def trl_advantages(rewards, G, scale_rewards):
    rewards = torch.tensor(rewards)
    mean = rewards.view(-1, G).mean(dim=1).repeat_interleave(G, dim=0)
    std = rewards.view(-1, G).std(dim=1).repeat_interleave(G, dim=0)
    adv = rewards - mean
    if scale_rewards:
        adv = adv / (std + 1e-4)
    return adv.numpy(), mean.numpy(), std.numpy()


def trl_loss(logps, old, ref, adv, mask, s: GRPOSettings):
    """TRL's ``_compute_loss`` after the forward; returns (loss, grad wrt logps, metrics)."""
    per_token_logps = torch.tensor(logps, requires_grad=True)
    old = per_token_logps.detach() if old is None else torch.tensor(old)
    mask = torch.tensor(mask, dtype=torch.float32)
    adv = torch.tensor(adv)
    if s.beta != 0.0:
        ref = torch.tensor(ref)
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    log_ratio = per_token_logps - old
    if s.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - s.epsilon_low, 1 + s.epsilon_upper)
    if s.delta is not None:
        coef_1 = torch.clamp(coef_1, max=s.delta)
    per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if s.beta != 0.0:
        per_token_loss = per_token_loss + s.beta * per_token_kl
    if s.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif s.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * s.max_completion_length)
    loss.backward()

    def bmean(x):
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / mask.sum().clamp(min=1.0)

    low = (coef_1 < 1 - s.epsilon_low) & (adv.unsqueeze(1) < 0)
    high = (coef_1 > 1 + s.epsilon_upper) & (adv.unsqueeze(1) > 0)
    metrics = {"clip_ratio/low_mean": bmean(low.float()), "clip_ratio/high_mean": bmean(high.float()),
               "clip_ratio/region_mean": bmean((low | high).float())}
    if s.beta != 0.0:
        metrics["kl"] = bmean(per_token_kl)
    return loss.item(), per_token_logps.grad.numpy(), {k: v.item() for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# Advantages and rewards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_group_advantages_match_trl(scale_rewards):
    rewards = np.random.RandomState(0).randn(12).astype(np.float32)
    adv, mean, std = group_advantages(jnp.asarray(rewards), 4, scale_rewards)
    want_adv, want_mean, want_std = trl_advantages(rewards, 4, scale_rewards)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=1e-5)


def test_a_group_with_equal_rewards_gets_zero_advantages_not_nan():
    rewards = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv, _, std = group_advantages(rewards, 4, scale_rewards=True)
    np.testing.assert_array_equal(np.asarray(adv[:4]), 0.0)
    assert float(std[0]) == 0.0 and np.all(np.isfinite(np.asarray(adv)))
    np.testing.assert_allclose(adv[4:], np.array([-0.5, 0.5, -0.5, 0.5]) / (np.std([0, 1, 0, 1], ddof=1) + 1e-4),
                               rtol=1e-6)


def test_combine_rewards_is_trls_weighted_nansum():
    r = np.array([[1.0, np.nan], [0.5, 2.0], [np.nan, np.nan]], np.float32)
    got = combine_rewards(jnp.asarray(r), (2.0, 0.5))
    want = (torch.tensor(r) * torch.tensor([2.0, 0.5]).unsqueeze(0)).nansum(dim=1).numpy()
    np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError, match="reward_weights"):
        combine_rewards(jnp.asarray(r), (1.0,))


def test_is_truncated_means_no_eos_in_the_window():
    completions = jnp.asarray([[5, 2, 0], [5, 6, 7], [5, 6, 2]])
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(is_truncated(completions, mask, EOS), [False, True, False])
    np.testing.assert_array_equal(is_truncated(completions, mask, None), [False, True, True])


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------

LOSS_CASES = [
    dict(loss_type=lt, beta=beta, importance_sampling_level=lvl, epsilon_high=eh, delta=delta)
    for (lt, beta, lvl, eh, delta) in [
        *[(lt, b, "token", None, None) for lt, b in itertools.product(("grpo", "bnpo", "dr_grpo"), (0.0, 0.04))],
        ("bnpo", 0.04, "token", 0.28, 1.5),
        ("grpo", 0.0, "sequence", None, None),
        ("dr_grpo", 0.04, "sequence", 0.3, None),
    ]
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_grpo_loss_value_gradient_and_metrics_match_trl(case):
    s = GRPOSettings(num_generations=2, generation_batch_size=4, max_completion_length=7, **case)
    rs = np.random.RandomState(1)
    logps = (-rs.rand(4, 6) * 2).astype(np.float32)
    old = (logps + rs.randn(4, 6) * 0.3).astype(np.float32)  # ratios far enough from 1 to clip
    ref = (logps + rs.randn(4, 6) * 0.2).astype(np.float32)
    adv = np.array([1.0, -1.0, 0.5, -0.2], np.float32)
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5], np.float32)

    def f(lp):
        return grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), s)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logps))
    want_loss, want_grad, want_metrics = trl_loss(logps, old, ref, adv, mask, s)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert want_metrics["clip_ratio/region_mean"] > 0 or case["importance_sampling_level"] == "sequence"


def test_ratio_one_when_old_logprobs_are_the_current_ones():
    """One update per rollout: TRL uses ``per_token_logps.detach()``; the gradient is then the
    plain policy gradient ``-A * mask / count`` (bnpo) and nothing is clipped."""
    s = GRPOSettings(num_generations=2, generation_batch_size=2)
    logps = jnp.asarray([[-1.0, -2.0], [-0.5, -0.1]])
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
    adv = jnp.asarray([2.0, -1.0])
    (loss, m), g = jax.value_and_grad(lambda lp: grpo_loss(lp, None, None, adv, mask, s), has_aux=True)(logps)
    np.testing.assert_allclose(g, -adv[:, None] * mask / 3.0, rtol=1e-6)
    assert float(m["clip_ratio/region_mean"]) == 0.0
    want_loss, want_grad, _ = trl_loss(np.asarray(logps), None, None, np.asarray(adv), np.asarray(mask), s)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_all_truncated_completions_masked_give_zero_loss_and_gradient(loss_type):
    """``mask_truncated_completions`` with every completion truncated: the mask is all zero, the
    loss 0 and finite (TRL's ``clamp(min=1)``), no gradient."""
    s = GRPOSettings(num_generations=2, generation_batch_size=2, loss_type=loss_type, beta=0.04,
                     mask_truncated_completions=True)
    logps = jnp.asarray([[-1.0, -2.0], [-0.5, -0.1]])
    f = lambda lp: grpo_loss(lp, lp - 0.1, lp + 0.2, jnp.asarray([1.0, -1.0]), jnp.zeros((2, 2)), s)  # noqa: E731
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(logps)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_settings_refuse_what_trl_refuses():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOSettings(num_generations=1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOSettings(num_generations=3, generation_batch_size=8)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOSettings(loss_type="dapo_typo")
    with pytest.raises(ValueError, match="steps_per_generation"):
        GRPOSettings(num_generations=2, generation_batch_size=6, steps_per_generation=4)


# --------------------------------------------------------------------------------------------
# Rollout, step and loop on a tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    lm = model_from_config(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=EOS))
    params = init_params(lm, jax.random.PRNGKey(0))
    gen = make_generate_fn(lm, max_new_tokens=6, do_sample=True, eos_token_id=EOS, pad_token_id=PAD, jit=False)
    prompts = np.random.RandomState(0).randint(3, VOCAB, (16, 4)).astype(np.int32)
    return dict(lm=lm, params=params, gen=gen, prompts=prompts)


class CountingModule:
    """A stand-in for a flax module that counts how often its forward is traced."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.module.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.mark.parametrize("beta,forwards", [(0.0, 0), (0.04, 1)])
def test_beta_zero_runs_no_reference_forward(tiny, beta, forwards):
    """The reference module is traced once with ``beta > 0`` and never with ``beta = 0`` (so the
    compiled rollout holds no reference forward), and the batch carries no ref log-probs."""
    s = GRPOSettings(num_generations=2, generation_batch_size=4, max_completion_length=6, beta=beta)
    ref = CountingModule(tiny["lm"])
    rollout = make_grpo_rollout(tiny["lm"], tiny["gen"], s, ref_module=ref, eos_token_id=EOS)
    state = GRPOTrainState.create(tiny["params"], optax.sgd(0.1), ref_params=tiny["params"])
    batch = jax.eval_shape(rollout, state, tiny["prompts"][:2], np.ones((2, 4), np.int32), jax.random.PRNGKey(0))
    assert ref.calls == forwards
    assert (batch.ref_logprobs is None) == (beta == 0.0)
    assert batch.old_logprobs is None  # one update per rollout: no "old" forward either
    assert batch.completions.shape == (4, 6)


LEARN_STEPS = 12


@pytest.fixture(scope="module")
def compiled_train(tiny):
    """ONE compiled ``make_train`` (shared by the two checks below): ``num_iterations=2`` x
    ``steps_per_generation=2`` (old log-probs from the rollout), ``beta > 0``, two reward
    functions scaled by ``reward_params`` [2] (0 makes every reward 0 or NaN)."""
    s = GRPOSettings(num_generations=4, generation_batch_size=16, max_completion_length=6, beta=0.04,
                     num_iterations=2, steps_per_generation=2, reward_weights=(1.0, 0.5), epsilon_high=0.28)
    tx = optax.adam(3e-2)

    def count_fives(w, b: GRPOBatch):
        return w[0] * ((b.completions == 5) * b.completion_mask).sum(-1).astype(jnp.float32)

    def ends(w, b: GRPOBatch):  # NaN = "does not apply" for truncated rows (TRL's None)
        return w[1] * jnp.where(b.truncated, jnp.nan, 1.0)

    train = jax.jit(make_train(tiny["lm"], s, tiny["gen"], [count_fives, ends], LEARN_STEPS, tx, eos_token_id=EOS),
                    compiler_options=FAST_COMPILE)
    state = GRPOTrainState.create(tiny["params"], tx, ref_params=tiny["params"])
    return lambda weights: (state, *train(state, jnp.asarray(weights, jnp.float32), tiny["prompts"],
                                          np.ones_like(tiny["prompts"])))


def test_groups_with_equal_rewards_leave_the_params_unchanged(compiled_train):
    """Every reward 0 (or NaN, "not applicable", counted as 0): equal rewards in every group, zero
    advantages, zero policy gradient; the KL term's gradient is zero at the reference (k3's
    derivative ``1 - exp(ref - logp)`` vanishes there), so after 12 iterations (48 updates) the
    params are exactly the initial ones, ``frac_reward_zero_std`` is 1 and the KL 0."""
    state, final, stats = compiled_train([0.0, 0.0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, final.params, state.params)
    np.testing.assert_array_equal(np.asarray(stats["frac_reward_zero_std"]), 1.0)
    np.testing.assert_array_equal(np.asarray(stats["reward_std"]), 0.0)
    np.testing.assert_array_equal(np.asarray(stats["kl"]), 0.0)
    assert int(final.step) == LEARN_STEPS


@pytest.mark.slow
def test_make_train_learns_with_reuse_of_the_rollout_and_a_kl_term(compiled_train):
    """The same program with the rewards on: the weighted reward rises, the KL stays finite and
    the clipping is active."""
    _, final, stats = compiled_train([1.0, 1.0])
    per_func = np.asarray(stats["rewards/mean_per_func"])  # [12, 2]
    assert per_func.shape == (LEARN_STEPS, 2)
    assert per_func[-3:, 0].mean() > per_func[:3, 0].mean() + 2.0, per_func[:, 0]
    assert np.all(np.isfinite(np.asarray(stats["kl"]))) and np.asarray(stats["kl"]).max() > 0
    assert np.asarray(stats["clip_ratio/region_mean"]).max() > 0
    assert int(final.step) == LEARN_STEPS
