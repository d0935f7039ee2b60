"""rljax.rloo: advantages and loss against TRL's ``RLOOTrainer`` (v0.19.1, ``train()`` restated
in torch below: KL in the reward, the vectorised leave-one-out baseline on a ``[k, Bp]``
layout, the sequence-ratio clipped loss), the corner cases (equal rewards in a group,
``kl_coef = 0`` running no reference forward) and one compiled ``make_train`` shared by the
"learns" and "equal scores" checks. The ``RLOOTrainer`` shell (TRL's log keys, checkpoints and
resuming) is tested through ``rljax rloo`` in tests/test_cli_grpo.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from rljax.generation import make_generate_fn
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.rloo import (
    RLOOBatch,
    RLOOSettings,
    RLOOTrainState,
    make_rloo_rollout,
    make_train,
    rloo_advantages,
    rloo_loss,
)

VOCAB, PAD, EOS = 32, 0, 2
# Tiny programs, many compiles: XLA's backend optimisations cost more CPU time than they save here
# (compile 5.6 -> 3.9 s for a GRPO make_train on 2 cores). Same options on both sides of every comparison.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def trl_rloo_advantages(scores, logprobs, ref_logprobs, mask, s: RLOOSettings):
    """TRL v0.19's step 4 on ITS layout: rows ``[k, Bp]`` (``queries.repeat(k, 1)``), pads filled
    with INVALID_LOGPROB (1.0) in both log-prob tensors."""
    k = s.rloo_k
    scores = torch.tensor(scores)
    padding = ~torch.tensor(mask, dtype=torch.bool)
    logprobs = torch.masked_fill(torch.tensor(logprobs), padding, 1.0)
    ref_logprobs = torch.masked_fill(torch.tensor(ref_logprobs), padding, 1.0)
    kl = logprobs - ref_logprobs
    if s.normalize_reward:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
        scores = torch.clamp(scores, -s.reward_clip_range, s.reward_clip_range)
    if s.token_level_kl:
        kl_reward = -s.kl_coef * kl
        eos_indices = padding.size(1) - 1 - padding.long().fliplr().argmax(dim=1, keepdim=True)
        last_reward = torch.zeros_like(kl)
        last_reward.scatter_(dim=1, index=eos_indices, src=scores.reshape(-1, 1))
        rlhf_reward = (last_reward + kl_reward).sum(1)
    else:
        rlhf_reward = -s.kl_coef * kl.sum(1) + scores
    rlhf_reward = rlhf_reward.reshape(k, -1)
    baseline = (rlhf_reward.sum(0) - rlhf_reward) / (k - 1)
    adv = (rlhf_reward - baseline).flatten()
    if s.normalize_advantage:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv.numpy(), rlhf_reward.flatten().numpy()


def to_trl_layout(x, k):
    """rljax rows ``[Bp, k]`` (a prompt's samples contiguous) -> TRL rows ``[k, Bp]``."""
    x = np.asarray(x)
    return x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


CASES = {
    "sequence_kl": dict(),
    "token_kl": dict(token_level_kl=True),
    "normalized": dict(normalize_reward=True, reward_clip_range=0.8, normalize_advantage=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rloo_advantages_match_trl(name):
    s = RLOOSettings(rloo_k=3, batch_size=6, kl_coef=0.1, **CASES[name])
    rs = np.random.RandomState(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    lp = (-rs.rand(6, 4)).astype(np.float32) * mask
    ref = (-rs.rand(6, 4)).astype(np.float32) * mask
    scores = rs.randn(6).astype(np.float32)
    adv, parts = rloo_advantages(jnp.asarray(scores), jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask), s)
    k = s.rloo_k
    want_adv, want_rlhf = trl_rloo_advantages(
        to_trl_layout(scores, k), to_trl_layout(lp, k), to_trl_layout(ref, k), to_trl_layout(mask, k), s
    )
    np.testing.assert_allclose(to_trl_layout(adv, k), want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_trl_layout(parts["rlhf_reward"], k), want_rlhf, rtol=1e-5, atol=1e-6)


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    """The paper's formula, by hand: ``A_i = R_i - mean_{j != i} R_j``; equal rewards -> 0."""
    s = RLOOSettings(rloo_k=4, batch_size=8, kl_coef=0.0)
    r = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0], np.float32)
    zeros = jnp.zeros((8, 3))
    adv, _ = rloo_advantages(jnp.asarray(r), zeros, zeros, jnp.ones((8, 3)), s)
    want = [r[i] - np.mean([r[j] for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i]) for i in range(8)]
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(adv[4:]), 0.0)


def test_missing_eos_penalty_lowers_the_scores_of_unfinished_completions():
    s = RLOOSettings(rloo_k=2, batch_size=2, kl_coef=0.0, missing_eos_penalty=1.5)
    _, parts = rloo_advantages(jnp.asarray([1.0, 1.0]), jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)), s,
                               contains_eos=jnp.asarray([True, False]))
    np.testing.assert_allclose(parts["scores"], [1.0, -0.5])


def trl_rloo_loss(new, old, adv, mask, cliprange):
    """TRL v0.19's minibatch loss; pads hold INVALID_LOGPROB in both tensors (diff 0)."""
    padding = ~torch.tensor(mask, dtype=torch.bool)
    new_t = torch.tensor(new, requires_grad=True)
    new_logprobs = torch.masked_fill(new_t, padding, 1.0)
    old_logprobs = torch.masked_fill(torch.tensor(old), padding, 1.0)
    adv = torch.tensor(adv)
    diff = new_logprobs.sum(1) - old_logprobs.sum(1)
    ratio = torch.exp(diff)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(pg1, pg2).mean()
    loss.backward()
    return loss.item(), new_t.grad.numpy(), (pg2 > pg1).float().mean().item(), (0.5 * (diff ** 2).mean()).item()


def test_rloo_loss_value_gradient_and_stats_match_trl():
    rs = np.random.RandomState(2)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    new = (-rs.rand(4, 3)).astype(np.float32)
    old = (new + rs.randn(4, 3) * 0.5).astype(np.float32)
    adv = np.array([1.0, -0.5, 0.3, -2.0], np.float32)
    f = lambda lp: rloo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)  # noqa: E731
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(new))
    want_loss, want_grad, clipfrac, approxkl = trl_rloo_loss(new, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(g, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["pg_clipfrac"], clipfrac)
    np.testing.assert_allclose(m["approxkl"], approxkl, rtol=1e-5)
    assert 0 < clipfrac < 1


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="rloo_k"):
        RLOOSettings(rloo_k=1)
    with pytest.raises(ValueError, match="multiple of rloo_k"):
        RLOOSettings(rloo_k=3, batch_size=8)


# --------------------------------------------------------------------------------------------
# On a tiny model
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
    def __init__(self, module):
        self.module, self.calls = module, 0

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.module.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.mark.parametrize("kl_coef,forwards", [(0.0, 0), (0.05, 1)])
def test_kl_coef_zero_runs_no_reference_forward(tiny, kl_coef, forwards):
    s = RLOOSettings(rloo_k=2, batch_size=4, kl_coef=kl_coef)
    ref = CountingModule(tiny["lm"])
    rollout = make_rloo_rollout(tiny["lm"], tiny["gen"], s, ref_module=ref, eos_token_id=EOS)
    state = RLOOTrainState.create(tiny["params"], optax.sgd(0.1), ref_params=tiny["params"])
    jax.eval_shape(rollout, state, tiny["prompts"][:2], np.ones((2, 4), np.int32), jax.random.PRNGKey(0))
    assert ref.calls == forwards


LEARN_STEPS = 10


@pytest.fixture(scope="module")
def compiled_train(tiny):
    """ONE compiled ``make_train`` (shared by the two checks below): ``rloo_k=4``, a KL to the
    reference in the reward, 2 epochs x 2 mini-batches per rollout; the score (number of token-5s)
    is scaled by ``reward_params`` (0: every score 0)."""
    s = RLOOSettings(rloo_k=4, batch_size=16, kl_coef=0.05, num_ppo_epochs=2, num_mini_batches=2)
    tx = optax.adam(3e-2)

    def count_fives(w, b: RLOOBatch):
        return w * ((b.completions == 5) * b.completion_mask).sum(-1).astype(jnp.float32)

    train = jax.jit(make_train(tiny["lm"], s, tiny["gen"], count_fives, LEARN_STEPS, tx, eos_token_id=EOS),
                    compiler_options=FAST_COMPILE)
    state = RLOOTrainState.create(tiny["params"], tx, ref_params=tiny["params"])
    return lambda w: (state, *train(state, jnp.float32(w), tiny["prompts"], np.ones_like(tiny["prompts"])))


def test_equal_scores_leave_the_params_unchanged(compiled_train):
    """Equal scores in each group and a policy at its reference (KL penalty 0): zero advantages,
    an exactly zero update in every epoch and mini-batch, ratios exactly 1, for all 10 rollouts."""
    state, final, stats = compiled_train(0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final.params, state.params)
    np.testing.assert_array_equal(np.asarray(stats["val/ratio"]), 1.0)
    np.testing.assert_array_equal(np.asarray(stats["objective/kl"]), 0.0)


@pytest.mark.slow
def test_make_train_learns_a_token_counting_reward(compiled_train):
    _, final, stats = compiled_train(1.0)
    reward = np.asarray(stats["objective/scores"])
    assert reward[-3:].mean() > reward[:3].mean() + 2.0, reward
    assert np.all(np.isfinite(np.asarray(stats["objective/kl"])))
    assert np.asarray(stats["objective/kl"])[-1] > 0
    assert int(final.step) == LEARN_STEPS
