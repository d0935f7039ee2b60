"""rljax.trainers.ppo: the TRL 0.7.11-compatible PPOTrainer shell (in the spirit of TRL's
tests/test_ppo_trainer.py): step() stats and updates, reference models with really shared
layers, response masks, input validation, generate(), the dataloader, log_stats and saving.

One trainer compiles its forward pass and PPO step once per padded (query, response) bucket;
every step() here uses queries and responses of at most 8 tokens, so one bucket per trainer.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
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


def make_config(**kw):
    return PPOConfig(**{**dict(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3), **kw})


@pytest.fixture(scope="module")
def trainer(model, tokenizer):
    return PPOTrainer(make_config(), model, ref_model=None, tokenizer=tokenizer)


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
    # The caller's model keeps its (undonated, unchanged) arrays.
    assert not changed(model.params, caller_params)
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
    keep = np.concatenate([np.zeros((BATCH, P - 1)), np.stack([np.pad(m, (0, N - len(m))) for m in masks])], 1)
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
    full = flatten_dict(model.params)
    ref_flat = flatten_dict(ref)
    assert len(ref_flat) < len(full)
    shared = {"/".join(k) for k in full if k not in ref_flat}
    assert any(k.startswith("transformer/h_0/") for k in shared) and "transformer/wte/embedding" in shared
    assert not any(k.startswith(("transformer/h_1/", "v_head/")) for k in shared)
    assert sum(v.size for v in ref_flat.values()) < sum(v.size for v in full.values())
    np.testing.assert_equal(snapshot(merge_reference(model.params, ref)), snapshot(model.params))
    assert len(flatten_dict(create_reference_model(model))) == len(full)  # no sharing: a full copy
    with pytest.raises(ValueError):
        create_reference_model(model, num_shared_layers=3)  # the model has 2 layers

    trainer = PPOTrainer(make_config(), model, tokenizer=tokenizer, num_shared_layers=1)
    assert len(flatten_dict(trainer.state.ref_params)) == len(ref_flat)
    before, ref_before = snapshot(trainer.state.params), snapshot(trainer.state.ref_params)
    stats = trainer.step(*batch(tokenizer))
    assert np.isfinite(stats["ppo/loss/total"])
    moved = changed(trainer.state.params, before)
    assert moved and not moved & shared  # the shared layers stay frozen in the policy
    assert any(k.startswith("transformer/h_1/") for k in moved) and any(k.startswith("v_head/") for k in moved)
    assert not changed(trainer.state.ref_params, ref_before)
    # The reference the trainer scores with is still exactly the initial model.
    np.testing.assert_equal(snapshot(merge_reference(trainer.state.params, trainer.state.ref_params)),
                            snapshot(model.params))


def test_num_shared_layers_is_ignored_with_an_explicit_ref_model(model, tokenizer):
    with pytest.warns(UserWarning, match="num_shared_layers"):
        trainer = PPOTrainer(make_config(), model, ref_model=model, tokenizer=tokenizer, num_shared_layers=1)
    assert trainer.num_shared_layers is None
    assert len(flatten_dict(trainer.state.ref_params)) == len(flatten_dict(model.params))


# --------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_trainer(model, tokenizer):
    """A fresh trainer (policy == reference); generation compiles once per settings, shared."""
    return PPOTrainer(make_config(), model, tokenizer=tokenizer)


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
    trainer = PPOTrainer(make_config(), model, tokenizer=tokenizer, dataset=dataset)
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
    tr = PPOTrainer(config, model, tokenizer=tokenizer)
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
