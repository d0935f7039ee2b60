"""rljax.sweep: ``jax.vmap`` over a whole ``make_train`` (PPO, GRPO, RLOO) trains several seeds
and learning rates in one compiled program, and each vmapped run equals its own single run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax import grpo, rloo
from rljax.generation import make_generate_fn
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.sweep import (
    curves,
    make_sweep,
    plot_curves,
    stack,
    summarize,
    unstack,
    with_learning_rates,
    with_seeds,
)

VOCAB, PAD, EOS, STEPS = 32, 0, 2, 2
SEEDS, LRS = [0, 1], [0.3, 0.1]
# vmap batches the matmuls: float32 results may differ in the last bits from the single run.
RTOL, ATOL = 1e-4, 1e-5
# Tiny programs, many compiles: XLA's backend optimisations cost more CPU time than they save here
# (compile 5.6 -> 3.9 s for a GRPO make_train on 2 cores). Same options on both sides of every comparison.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def injected_sgd(learning_rate: float):
    """SGD with the learning rate as a state leaf (what ``with_learning_rates`` sweeps). Not Adam:
    some gradients are zero in exact arithmetic (attention's key bias: softmax is shift-invariant)
    and float noise (~1e-9) in practice, and Adam's normalisation turns that noise into updates of
    up to +-lr that differ between two equal programs (seen with eps=1e-4: 1.1e-5 apart). SGD keeps
    noise as noise."""
    import optax

    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)


@pytest.fixture(scope="module")
def tiny():
    lm = model_from_config(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=EOS))
    params = init_params(lm, jax.random.PRNGKey(0))
    gen = make_generate_fn(lm, max_new_tokens=3, do_sample=True, eos_token_id=EOS, pad_token_id=PAD, jit=False)
    prompts = np.random.RandomState(0).randint(3, VOCAB, (4, 3)).astype(np.int32)
    return dict(lm=lm, params=params, gen=gen, prompts=prompts, mask=np.ones_like(prompts))


def fives(completions, mask):
    return ((completions == 5) * mask).sum(-1).astype(jnp.float32)


def build(name, tiny):
    """(train, state) of one algorithm with an injected-learning-rate optimizer."""
    lm, params, gen = tiny["lm"], tiny["params"], tiny["gen"]
    if name == "grpo":
        tx = injected_sgd(0.1)
        s = grpo.GRPOSettings(num_generations=2, generation_batch_size=4, max_completion_length=3, beta=0.04)
        train = grpo.make_train(lm, s, gen, lambda _, b: fives(b.completions, b.completion_mask), STEPS, tx,
                                eos_token_id=EOS)
        return train, grpo.GRPOTrainState.create(params, tx, ref_params=params)
    if name == "rloo":
        tx = injected_sgd(0.1)
        s = rloo.RLOOSettings(rloo_k=2, batch_size=4, num_ppo_epochs=1, num_mini_batches=2)
        train = rloo.make_train(lm, s, gen, lambda _, b: fives(b.completions, b.completion_mask), STEPS, tx,
                                eos_token_id=EOS)
        return train, rloo.RLOOTrainState.create(params, tx, ref_params=params)
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import PPOTrainState, make_train

    model = AutoModelForCausalLMWithValueHead.from_lm(lm, params, summary_dropout_prob=0.0)
    vgen = make_generate_fn(model.module, max_new_tokens=3, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
                            jit=False)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=0.1, seed=0)
    tx = injected_sgd(0.1)
    train = make_train(model.module, config, vgen, lambda _, r: fives(r.responses, r.response_mask), STEPS, tx=tx)
    return train, PPOTrainState.create(model.params, model.params, config, tx=tx)


def assert_close(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", ["grpo", "rloo", "ppo"])
def test_each_vmapped_run_equals_its_single_run(tiny, name):
    """Two runs (different seeds AND learning rates) in one vmapped program; each run's final
    state and stats equal ``jax.jit(train)`` on that run's state alone."""
    train, state = build(name, tiny)
    states = with_learning_rates(with_seeds(state, SEEDS), LRS)
    sweep = jax.jit(make_sweep(train, jit=False), compiler_options=FAST_COMPILE)  # make_sweep(train), fast to compile
    final, stats = sweep(states, None, tiny["prompts"], tiny["mask"])
    single = jax.jit(train, compiler_options=FAST_COMPILE)
    key = {"grpo": "reward", "rloo": "objective/scores", "ppo": "env/reward_mean"}[name]
    assert curves(stats, key).shape == (2, STEPS)
    for i in range(2):
        state_i = unstack(states, i)
        one_final, one_stats = single(state_i, None, tiny["prompts"], tiny["mask"])
        assert_close(unstack(final, i).params, one_final.params, f"{name} run {i} params")
        assert_close(unstack(stats, i), one_stats, f"{name} run {i} stats")
    # the runs really differ (seed and rate)
    leaf = lambda t: jax.tree_util.tree_leaves(t.params)[0]  # noqa: E731
    assert not np.allclose(leaf(unstack(final, 0)), leaf(unstack(final, 1)))


def test_with_learning_rates_needs_an_injected_rate_and_one_rate_per_run(tiny):
    import optax

    state = grpo.GRPOTrainState.create(tiny["params"], optax.adam(1e-3))
    with pytest.raises(ValueError, match="inject_hyperparams"):
        with_learning_rates(state, [1e-3, 1e-2])
    state = grpo.GRPOTrainState.create(tiny["params"], injected_sgd(1e-3))
    with pytest.raises(ValueError, match="one per run"):
        with_learning_rates(with_seeds(state, [0, 1, 2]), [1e-3, 1e-2])
    from rljax.ppo_train import learning_rate_of

    stacked = with_learning_rates(state, [1e-3, 1e-2])
    np.testing.assert_allclose([learning_rate_of(unstack(stacked, i).opt_state) for i in range(2)], [1e-3, 1e-2])


def test_curves_summary_and_plot(tmp_path):
    values = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]])
    s = summarize(values)
    np.testing.assert_allclose(s["mean"], [1, 2, 3])
    np.testing.assert_allclose(s["std"], [1, 1, 1])
    stats = stack([{"reward": jnp.arange(3.0)}, {"reward": jnp.arange(3.0) + 1}])
    np.testing.assert_allclose(curves(stats, "reward"), [[0, 1, 2], [1, 2, 3]])
    with pytest.raises(KeyError, match="available"):
        curves(stats, "nope")
    path = plot_curves({"a": values, "b": values[:1]}, str(tmp_path / "c.png"), spread="minmax", title="t")
    assert (tmp_path / "c.png").stat().st_size > 1000 and path.endswith("c.png")
