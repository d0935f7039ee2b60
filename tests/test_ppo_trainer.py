"""rljax.trainers.ppo: the TRL 0.7.11-compatible PPOTrainer shell (in the spirit of TRL's
tests/test_ppo_trainer.py): step() stats and updates, reference models with really shared
layers, response masks, input validation, generate(), the dataloader, log_stats and saving.

One trainer compiles its forward pass and PPO step once per padded (query, response) bucket;
every step() here uses queries and responses of at most 8 tokens, so one bucket per trainer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from rljax.core import LengthSampler
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.models.heads import AutoModelForCausalLMWithValueHead
from rljax.ppo import PPOConfig
from rljax.trainers.ppo import PPOTrainer, create_reference_model, merge_reference

# The full key list TRL 0.7.11's step() returns (non-wandb: scalars as Python floats).
TRL_STEP_KEYS = [
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "objective/kl_coef",
    "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores", "ppo/std_scores",
    "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/queries_dist", "tokens/responses_len_mean",
    "tokens/responses_len_std", "tokens/responses_dist", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
    "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
    "ppo/policy/advantages", "ppo/policy/advantages_mean", "ppo/policy/ratio", "ppo/returns/mean",
    "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "ppo/learning_rate", "time/ppo/forward_pass", "time/ppo/compute_rewards",
    "time/ppo/compute_advantages", "time/ppo/optimize_step", "time/ppo/calc_stats", "time/ppo/total",
]
DIST_KEYS = {"objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "tokens/queries_dist",
             "tokens/responses_dist", "ppo/policy/advantages", "ppo/policy/ratio"}

BATCH = 4


def snapshot(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def changed(a, b):
    return {"/".join(k) for k, v in flatten_dict(a).items() if not np.array_equal(v, flatten_dict(b)[k])}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    """A 2-layer GPT-2 with TRL's default value-head dropout (0.1; PPO runs it in eval mode)."""
    lm = model_from_config(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return AutoModelForCausalLMWithValueHead.from_lm(lm, init_params(lm, jax.random.PRNGKey(0)))


def fresh(model):
    """A new model object on the fixture's weights: a trainer publishes its trained params on
    the object it is given (as TRL trains in place), so trainers must not share one."""
    return AutoModelForCausalLMWithValueHead(model.module, model.params)


def make_config(**kw):
    return PPOConfig(**{**dict(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3), **kw})


@pytest.fixture(scope="module")
def trainer(model, tokenizer):
    return PPOTrainer(make_config(), fresh(model), ref_model=None, tokenizer=tokenizer)


def batch(tokenizer, seed=0):
    """BATCH (query, response, score) triples; queries 2-6 tokens, responses 3-8 (one padded bucket)."""
    rs = np.random.RandomState(seed)
    queries = [rs.randint(3, len(tokenizer), n).astype(np.int64) for n in rs.randint(2, 7, BATCH)]
    responses = [rs.randint(3, len(tokenizer), n).astype(np.int64) for n in rs.randint(3, 9, BATCH)]
    scores = [np.float32(s) for s in rs.randn(BATCH)]
    return queries, responses, scores


# --------------------------------------------------------------------------
# step()
# --------------------------------------------------------------------------


def test_step_returns_trl_stats_and_trains_policy_not_reference(trainer, model, tokenizer):
    before, ref_before = snapshot(trainer.state.params), snapshot(trainer.state.ref_params)
    caller_params = snapshot(model.params)
    stats = trainer.step(*batch(tokenizer))

    missing = sorted(set(TRL_STEP_KEYS) - set(stats))
    assert not missing, missing
    for key in TRL_STEP_KEYS:
        if key in DIST_KEYS:
            assert isinstance(stats[key], np.ndarray) and stats[key].size > 1, key
        else:
            assert isinstance(stats[key], float), (key, type(stats[key]))
        assert np.all(np.isfinite(stats[key])), key
    assert stats["objective/kl_dist"].shape == (BATCH,)
    assert stats["ppo/learning_rate"] == pytest.approx(1e-3)
    assert stats["objective/kl_coef"] == pytest.approx(0.2)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first step: policy == reference

    # The policy trains (the LM and the value head); the reference does not.
    moved = changed(trainer.state.params, before)
    assert any(k.startswith("v_head/") for k in moved)
    assert any(k.startswith("transformer/h_1/") for k in moved)
    assert any(k.startswith("transformer/wte") for k in moved)
    assert not changed(trainer.state.ref_params, ref_before)
    # The trainer trained a copy: arrays the caller passed in stay valid and unchanged ...
    assert not changed(model.params, caller_params)
    # ... and the model object given to the trainer holds the trained state (TRL trains in place).
    assert trainer.model.params is trainer.state.params
    assert not changed(trainer.ref_model.params, ref_before)
    assert trainer.kl_ctl_value == pytest.approx(float(trainer.state.kl.value)) != 0.2  # adaptive update

    # A second step sees a policy that differs from the reference: KL is no longer zero.
    stats = trainer.step(*batch(tokenizer, seed=1))
    assert abs(stats["objective/kl"]) > 1e-6
    assert trainer.current_step == 2


def test_step_with_response_masks_masks_the_stats(trainer, tokenizer):
    """The masked-out response tokens leave the per-token stats (here objective/entropy, the
    summed -logprob of the kept tokens, checked against a forward pass of the same params)."""
    queries, responses, scores = batch(tokenizer, seed=2)
    masks = [np.ones(len(r), np.int64) for r in responses]
    for m in masks:
        m[-2:] = 0  # drop the last two tokens of every response
    P, N = 8, 8
    q = np.stack([np.pad(x, (P - len(x), 0)) for x in queries])
    qm = np.stack([np.pad(np.ones(len(x), np.int32), (P - len(x), 0)) for x in queries])
    r = np.stack([np.pad(x, (0, N - len(x))) for x in responses])
    rm = np.stack([np.pad(np.ones(len(x), np.int32), (0, N - len(x))) for x in responses])
    rollout = trainer._forward(trainer.state.params, trainer.state.ref_params, q, qm, r, rm)
    keep = np.stack([np.pad(m, (0, N - len(m))) for m in masks])  # [B, N], aligned with the responses
    expected = (-np.asarray(rollout.logprobs) * np.asarray(rollout.masks) * keep).sum(-1).mean()
    unmasked = (-np.asarray(rollout.logprobs) * np.asarray(rollout.masks)).sum(-1).mean()

    before = snapshot(trainer.state.params)
    stats = trainer.step(queries, responses, scores, response_masks=masks)
    assert stats["objective/entropy"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - unmasked) > 1e-2
    assert changed(trainer.state.params, before)


@pytest.mark.parametrize("case", [
    "queries_not_list", "short_batch", "scores_2d", "scores_element_2d", "scores_short", "scores_nan",
    "empty_response", "empty_query", "mask_length",
])
def test_step_rejects_bad_inputs_before_touching_state(trainer, tokenizer, case):
    queries, responses, scores = batch(tokenizer, seed=3)
    kw = {}
    if case == "queries_not_list":
        queries = np.stack([np.resize(q, 4) for q in queries])  # a 2-D array, not a list
    elif case == "short_batch":
        queries, responses, scores = queries[:-1], responses[:-1], scores[:-1]
    elif case == "scores_2d":
        scores = np.ones((BATCH, 1), np.float32)
    elif case == "scores_element_2d":
        scores = [np.ones((1, 1), np.float32)] * BATCH
    elif case == "scores_short":
        scores = scores[:-1]
    elif case == "scores_nan":
        scores = list(scores)
        scores[1] = np.float32("nan")
    elif case == "empty_response":
        responses = [responses[0][:0]] + responses[1:]
    elif case == "empty_query":
        queries = [queries[0][:0]] + queries[1:]
    elif case == "mask_length":
        kw["response_masks"] = [np.ones(len(r) + 1) for r in responses]
    step_before = int(trainer.state.step)
    with pytest.raises(ValueError):
        trainer.step(queries, responses, scores, **kw)
    assert int(trainer.state.step) == step_before


def test_config_rejects_mini_batch_that_does_not_divide_batch():
    with pytest.raises(ValueError, match="multiple"):
        PPOConfig(batch_size=4, mini_batch_size=3)
    with pytest.raises(ValueError, match="multiple"):
        PPOConfig(batch_size=4, mini_batch_size=2, gradient_accumulation_steps=3)
    PPOConfig(batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2)  # fine


# --------------------------------------------------------------------------
# Reference models
# --------------------------------------------------------------------------


def test_shared_layers_are_shared_frozen_and_not_copied(model, tokenizer):
    """num_shared_layers=1 (our fix: TRL 0.7.11 only freezes those layers): the embeddings and layer 0 live only in the
    policy params, frozen; the reference holds just the rest; layer 1, ln_f and v_head train."""
    ref = create_reference_model(model, num_shared_layers=1)
    assert isinstance(ref, AutoModelForCausalLMWithValueHead) and ref.module is model.module
    assert ref.num_shared_layers == 1
    full, ref_flat = flatten_dict(model.params), flatten_dict(ref.params)
    assert set(ref_flat) == set(full)
    shared = {"/".join(k) for k in full if ref_flat[k] is full[k]}  # the very same arrays: no copy
    assert any(k.startswith("transformer/h_0/") for k in shared) and "transformer/wte/embedding" in shared
    assert not any(k.startswith(("transformer/h_1/", "v_head/")) for k in shared)
    np.testing.assert_equal(snapshot(ref.params), snapshot(model.params))
    plain = create_reference_model(model)  # no sharing: a full copy
    assert plain.num_shared_layers is None
    assert not any(v is full[k] for k, v in flatten_dict(plain.params).items())
    with pytest.raises(ValueError):
        create_reference_model(model, num_shared_layers=3)  # the model has 2 layers

    for how in ("num_shared_layers", "ref_model"):
        policy = fresh(model)
        if how == "ref_model":  # TRL scripts: ref = create_reference_model(model, k); PPOTrainer(config, model, ref)
            trainer = PPOTrainer(make_config(), policy, create_reference_model(policy, num_shared_layers=1), tokenizer)
        else:
            trainer = PPOTrainer(make_config(), policy, tokenizer=tokenizer, num_shared_layers=1)
        assert trainer.num_shared_layers == 1
        assert len(flatten_dict(trainer.state.ref_params)) == len(full) - len(shared)
        before, ref_before = snapshot(trainer.state.params), snapshot(trainer.state.ref_params)
        stats = trainer.step(*batch(tokenizer))
        assert np.isfinite(stats["ppo/loss/total"])
        moved = changed(trainer.state.params, before)
        assert moved and not moved & shared  # the shared layers stay frozen in the policy
        assert any(k.startswith("transformer/h_1/") for k in moved) and any(k.startswith("v_head/") for k in moved)
        assert not changed(trainer.state.ref_params, ref_before)
        # The reference the trainer scores with (and trainer.ref_model) is still exactly the initial model.
        np.testing.assert_equal(snapshot(merge_reference(trainer.state.params, trainer.state.ref_params)),
                                snapshot(model.params))
        np.testing.assert_equal(snapshot(trainer.ref_model.params), snapshot(model.params))


def test_custom_optimizer_does_not_move_shared_layers(model, tokenizer):
    """A user's optax.adamw (weight decay included) with num_shared_layers: the shared layers stay
    frozen (updates zeroed in the step), so the reference read from them does not drift."""
    trainer = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, num_shared_layers=1,
                         optimizer=optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1))
    before = snapshot(trainer.state.params)
    trainer.step(*batch(tokenizer))
    moved = changed(trainer.state.params, before)
    assert not any(k.startswith(("transformer/h_0/", "transformer/wte", "transformer/wpe")) for k in moved)
    assert any(k.startswith("transformer/h_1/") for k in moved)
    np.testing.assert_equal(snapshot(trainer.ref_model.params), snapshot(model.params))


def test_num_shared_layers_is_ignored_with_an_explicit_ref_model(model, tokenizer):
    with pytest.warns(UserWarning, match="num_shared_layers"):
        ref = fresh(model)
        trainer = PPOTrainer(make_config(), fresh(model), ref_model=ref, tokenizer=tokenizer, num_shared_layers=1)
    assert trainer.num_shared_layers is None
    assert len(flatten_dict(trainer.state.ref_params)) == len(flatten_dict(model.params))
    assert trainer.ref_model is ref


# --------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_trainer(model, tokenizer):
    """A fresh trainer (policy == reference); generation compiles once per settings, shared."""
    return PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer)


GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


def test_generate_single_query_and_list(gen_trainer, tokenizer):
    queries, _, _ = batch(tokenizer, seed=4)
    single = gen_trainer.generate(queries[0], **GREEDY)
    assert single.shape == (1, len(queries[0]) + 6)  # TRL: model.generate's [1, length]
    np.testing.assert_array_equal(single[0, : len(queries[0])], queries[0])
    only = gen_trainer.generate(queries[0], return_prompt=False, **GREEDY)
    np.testing.assert_array_equal(only[0], single[0, len(queries[0]):])

    outs = gen_trainer.generate(queries, batch_size=3, **GREEDY)  # chunks of 3 and 1
    assert isinstance(outs, list) and len(outs) == BATCH
    responses = gen_trainer.generate(queries, batch_size=3, return_prompt=False, **GREEDY)
    for q, o, r in zip(queries, outs, responses):
        assert o.ndim == 1 and len(o) == len(q) + 6 and len(r) == 6
        np.testing.assert_array_equal(o[: len(q)], q)
        np.testing.assert_array_equal(o[len(q):], r)
    # Batched (left-padded with other queries) == one query at a time.
    for q, r in zip(queries, responses):
        np.testing.assert_array_equal(gen_trainer.generate(q, return_prompt=False, **GREEDY)[0], r)
    with pytest.raises(ValueError):
        gen_trainer.generate(np.stack([queries[0][:2], queries[1][:2]]), **GREEDY)  # 2-D: use a list


def test_generate_stops_at_eos_and_removes_padding(gen_trainer, tokenizer):
    queries, _, _ = batch(tokenizer, seed=4)
    free = gen_trainer.generate(queries, return_prompt=False, **GREEDY)
    eos = int(free[0][2])  # the third greedy token of the first query becomes "eos"
    kw = dict(GREEDY, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    cut = gen_trainer.generate(queries, return_prompt=False, **kw)
    first = list(free[0]).index(eos)
    np.testing.assert_array_equal(cut[0], free[0][: first + 1])  # ends with its eos
    padded = gen_trainer.generate(queries, return_prompt=False, remove_padding=False, **kw)
    assert all(len(p) == 6 for p in padded)
    np.testing.assert_array_equal(padded[0][first + 1:], tokenizer.pad_token_id)
    for c, f in zip(cut, free):
        hits = [i for i, t in enumerate(f) if t == eos]
        np.testing.assert_array_equal(c, f[: hits[0] + 1] if hits else f)


def test_generate_length_sampler_and_ref_response(gen_trainer, tokenizer):
    queries, _, _ = batch(tokenizer, seed=5)
    sampler = LengthSampler(3, 5, rng=0)
    outs = gen_trainer.generate(queries, length_sampler=sampler, batch_size=2, return_prompt=False, **GREEDY)
    assert {len(o) for o in outs} <= {3, 4}
    assert len(outs[0]) == len(outs[1]) and len(outs[2]) == len(outs[3])  # one length per chunk
    resp, ref_resp = gen_trainer.generate(queries, generate_ref_response=True, return_prompt=False, **GREEDY)
    assert len(resp) == len(ref_resp) == BATCH
    for a, b in zip(resp, ref_resp):  # policy == reference before any step
        np.testing.assert_array_equal(a, b)
    sampled = gen_trainer.generate(queries, return_prompt=False, max_new_tokens=6, top_k=0.0, top_p=1.0,
                                   min_length=-1, eos_token_id=None)  # TRL's example kwargs
    assert [len(s) for s in sampled] == [6] * BATCH


# --------------------------------------------------------------------------
# Data, logging, saving
# --------------------------------------------------------------------------


def test_dataloader_drops_the_last_incomplete_batch(model, tokenizer):
    dataset = [{"input_ids": np.arange(3 + i % 3), "query": f"q{i}"} for i in range(10)]
    trainer = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, dataset=dataset)
    assert len(trainer.dataloader) == 10 // BATCH
    batches = list(trainer.dataloader)
    assert len(batches) == 2
    for b in batches:
        assert set(b) == {"input_ids", "query"} and len(b["input_ids"]) == BATCH
    seen = [q for b in batches for q in b["query"]]
    assert len(set(seen)) == 8


def test_log_stats_adds_env_rewards(trainer, tokenizer):
    stats = trainer.step(*batch(tokenizer, seed=6))
    rewards = [np.float32(1.0), np.float32(2.0), np.float32(4.0), np.float32(-1.0)]
    logs = trainer.log_stats(stats, {"query": ["a"] * BATCH, "response": ["b"] * BATCH}, rewards)
    assert logs["env/reward_mean"] == pytest.approx(1.5)
    assert logs["env/reward_std"] == pytest.approx(np.std([1, 2, 4, -1], ddof=1))
    np.testing.assert_allclose(logs["env/reward_dist"], [1, 2, 4, -1])
    assert logs["objective/kl"] == stats["objective/kl"] and trainer.log_history[-1] is logs


def test_save_pretrained_loads_in_transformers_with_identical_logits(trainer, tokenizer, tmp_path):
    trainer.save_pretrained(str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    queries, responses, _ = batch(tokenizer, seed=7)
    ids = np.concatenate([queries[0], responses[0]])[None]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    out = trainer.module.apply({"params": trainer.state.params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out.logits), want, atol=1e-4, rtol=1e-4)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    np.testing.assert_equal(snapshot(reloaded.params), snapshot(trainer.state.params))


def test_log_stats_writes_to_the_configured_tracker(model, tokenizer, tmp_path):
    config = make_config(log_with="jsonl", project_kwargs={"logging_dir": str(tmp_path)})
    tr = PPOTrainer(config, fresh(model), tokenizer=tokenizer)
    stats = tr.step(*batch(tokenizer, seed=8))
    rewards = [1.0, 2.0, 3.0, 4.0]
    tr.log_stats(stats, {"query": ["q"] * BATCH, "response": ["r"] * BATCH}, rewards)
    tr._metric_logger().close()
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env/reward_mean"] == pytest.approx(2.5)
    assert rows[-1]["objective/kl"] == pytest.approx(stats["objective/kl"])
    samples = (tmp_path / "samples.jsonl").read_text()
    assert '"query"' in samples and '"reward"' in samples


def test_generate_with_only_a_length_sampler(gen_trainer, tokenizer):
    queries = [np.asarray(tokenizer("the movie").input_ids)] * 2
    out = gen_trainer.generate(queries, length_sampler=lambda: 3, return_prompt=False, do_sample=False, remove_padding=False)
    assert [len(r) for r in out] == [3, 3]


# --------------------------------------------------------------------------
# TRL attributes: the model object, kl_ctl, learning rate, early stopping, masks, data
# --------------------------------------------------------------------------


def test_model_object_holds_the_trained_params_and_saves_them(trainer, tokenizer, tmp_path):
    trainer.step(*batch(tokenizer, seed=9))
    assert trainer.model.params is trainer.state.params  # re-pointed after every (donating) step
    assert set(flatten_dict(trainer.ref_model.params)) == set(flatten_dict(trainer.state.params))
    trainer.model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    np.testing.assert_equal(snapshot(reloaded.params), snapshot(trainer.state.params))


def test_kl_ctl_is_trls_controller_over_the_state(trainer, model, tokenizer):
    from rljax.ppo import AdaptiveKLController, FixedKLController

    assert isinstance(trainer.kl_ctl, AdaptiveKLController)
    trainer.step(*batch(tokenizer, seed=10))
    assert trainer.kl_ctl.value == pytest.approx(float(trainer.state.kl.value))
    trainer.kl_ctl.value = 0.05  # a script's manual override is what the next step uses
    stats = trainer.step(*batch(tokenizer, seed=11))
    assert stats["objective/kl_coef"] == pytest.approx(0.05)
    assert trainer.kl_ctl.value == pytest.approx(float(trainer.state.kl.value)) != pytest.approx(0.05)
    fixed = PPOTrainer(make_config(adap_kl_ctrl=False), fresh(model), tokenizer=tokenizer)
    assert isinstance(fixed.kl_ctl, FixedKLController) and fixed.kl_ctl.value == pytest.approx(0.2)


def test_lr_scheduler_sets_the_rate_of_each_step_and_is_logged(model, tokenizer):
    schedule = optax.linear_schedule(1e-3, 0.0, transition_steps=4)  # the default Adam: no recompile
    tr = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, lr_scheduler=schedule)
    rates = [tr.step(*batch(tokenizer, seed=12 + i))["ppo/learning_rate"] for i in range(2)]
    np.testing.assert_allclose(rates, [1e-3, 7.5e-4], rtol=1e-6)
    with pytest.raises(ValueError, match="optax schedule"):
        PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, lr_scheduler=0.1)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, optimizer=optax.adam(1e-3), lr_scheduler=schedule)
    with pytest.warns(UserWarning, match="NaN"):  # an opaque optimizer cannot report its rate
        PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, optimizer=optax.adam(1e-3))


def test_early_stopping_leaves_the_skipped_epochs_out_of_the_stats(trainer, model, tokenizer):
    full = trainer.step(*batch(tokenizer, seed=14))
    T = 8  # one response bucket: per-token stats cover the response window [B, N]
    assert full["ppo/policy/ratio"].size == 2 * BATCH * T
    tr = PPOTrainer(make_config(early_stopping=True, target_kl=-1e9), fresh(model), tokenizer=tokenizer)
    stats = tr.step(*batch(tokenizer, seed=14))
    assert stats["ppo/epochs_run"] == 1
    for key in ("ppo/policy/ratio", "ppo/policy/advantages"):
        assert stats[key].size == BATCH * T and not np.any(stats[key] == -1.0), key


def test_step_rejects_response_masks_that_leave_fewer_than_two_tokens(trainer, tokenizer):
    queries, responses, scores = batch(tokenizer, seed=15)
    masks = [np.zeros(len(r), np.int64) for r in responses]
    masks[0][0] = 1  # one token in the whole batch: whitening the advantages is undefined
    step_before = int(trainer.state.step)
    with pytest.raises(ValueError):
        trainer.step(queries, responses, scores, response_masks=masks)
    with pytest.raises(ValueError):
        trainer.step(queries, responses, scores, response_masks=[np.zeros(len(r), np.int64) for r in responses])
    assert int(trainer.state.step) == step_before


def test_dataloader_rows_epochs_and_columns(model, tokenizer):
    import datasets

    tuples = [(np.arange(3) + i, np.arange(3) * i, f"q{i}", float(i)) for i in range(6)]
    tr = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, dataset=tuples)
    (q, r, text, score), = list(tr.dataloader)[:1]  # torch default_collate: a list of stacked fields
    assert q.shape == (BATCH, 3) and r.shape == (BATCH, 3) and isinstance(text, list) and score.shape == (BATCH,)
    first, second = [b[2] for b in tr.dataloader], [b[2] for b in tr.dataloader]
    assert len(first) == len(second) == 1 and first != second  # each loop is a fresh shuffled epoch
    with pytest.warns(UserWarning, match="No dataset is provided"):
        PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer)
    small = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, dataset=tuples[:3])
    assert len(small.dataloader) == 0 and list(small.dataloader) == []  # drop_last
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 4, "query": ["a"] * 4, "review": ["long"] * 4})
    kept = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer, dataset=ds)
    assert set(next(iter(kept.dataloader))) == {"input_ids", "query"}  # TRL's remove_unused_columns
    everything = PPOTrainer(make_config(remove_unused_columns=False), fresh(model), tokenizer=tokenizer, dataset=ds)
    assert set(next(iter(everything.dataloader))) == {"input_ids", "query", "review"}


def test_generate_with_a_length_sampler_compiles_once(trainer, tokenizer):
    """TRL's ``generate(..., length_sampler=LengthSampler(4, 9))``: every sampled length runs in
    one compiled program (the sampler's maximum width, the draw a traced limit); the responses
    are at most the drawn length."""
    from rljax import generation as G
    from rljax.core import LengthSampler

    queries, _, _ = batch(tokenizer, seed=5)
    draws = []

    class Recording(LengthSampler):
        def __call__(self):
            draws.append(super().__call__())
            return draws[-1]

    sampler = Recording(4, 9, rng=1)
    kw = dict(do_sample=True, top_k=0)
    before = sum(G.TRACE_COUNTS.values())
    for _ in range(5):
        out = trainer.generate(queries, length_sampler=sampler, batch_size=BATCH, return_prompt=False, **kw)
        assert all(len(r) <= draws[-1] for r in out)
    assert len(set(draws)) > 1, draws
    assert sum(G.TRACE_COUNTS.values()) - before <= 1


# --------------------------------------------------------------------------
# accelerator_kwargs: mixed_precision honoured, anything else refused
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"mixed_precision": "fp16"}, r"mixed_precision.*'fp16'.*use 'bf16'"),
    ({"mixed_precision": "bfloat16"}, r"must be 'no' or 'bf16'"),
    ({"cpu": True}, r"accelerator_kwargs \['cpu'\] have no rljax counterpart.*mesh="),
    ({"gradient_accumulation_steps": 2}, r"PPOConfig.gradient_accumulation_steps"),
])
def test_config_refuses_accelerator_kwargs_it_cannot_honour(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config(accelerator_kwargs=kwargs)
    make_config(accelerator_kwargs={"mixed_precision": "no"})  # float32, as the default


def test_mixed_precision_bf16_computes_in_bfloat16_with_float32_master_params(model, tokenizer):
    """accelerator_kwargs={"mixed_precision": "bf16"} (TRL: accelerate's bf16 autocast): the
    rollout forward, the PPO step and generation run their matmuls in bfloat16; params, Adam
    state, log-probs and stats stay float32; the stats track the float32 trainer's."""
    import re

    bf16_matmul = re.compile(r"bf16\[[^\]]*\] = dot_general")
    mixed = PPOTrainer(make_config(accelerator_kwargs={"mixed_precision": "bf16"}), fresh(model), tokenizer=tokenizer)
    plain = PPOTrainer(make_config(), fresh(model), tokenizer=tokenizer)
    assert mixed.mixed_precision == "bf16" and plain.mixed_precision == "no"
    q, qm = np.array([[3, 4, 5, 6]] * BATCH, np.int32), np.ones((BATCH, 4), np.int32)
    r, rm = np.array([[7, 8, 9]] * BATCH, np.int32), np.ones((BATCH, 3), np.int32)
    for trainer, want in ((mixed, True), (plain, False)):
        s = trainer.state
        jaxpr = str(jax.make_jaxpr(trainer._forward)(s.params, s.ref_params, q, qm, r, rm))
        assert bool(bf16_matmul.search(jaxpr)) == want
    stats = [t.step(*batch(tokenizer)) for t in (mixed, plain)]
    for key in ("ppo/loss/total", "ppo/policy/approxkl", "ppo/returns/mean", "objective/entropy"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=0.05, abs=2e-3), key
    leaves = jax.tree_util.tree_leaves((mixed.state.params, mixed.state.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert changed(mixed.state.params, snapshot(model.params))
    out = mixed.generate(np.array([3, 4, 5]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)  # a single query: the prompt and 3 new tokens, as TRL
    assert mixed.model.module is mixed.module  # the model object (what is saved) is the float32 one
