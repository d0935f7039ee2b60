"""TRL 0.7.11's tests/test_best_of_n_sampler.py on rljax (same cases and numbers), plus what
the rljax shell adds: one generation call for all queries x samples, a JAX scorer on tokens,
and the winners really being the best-scored samples.

TRL's dummy GPT-2 comes from the hub; a 2-layer GPT-2 with a value head on the session's tiny
BPE tokenizer stands in.
"""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from rljax.core import LengthSampler
from rljax.trainers.best_of_n import BestOfNSampler


def queries_to_scores(list_of_strings):
    return [random.random() for _ in list_of_strings]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    from rljax.models import GPT2Config, GPT2LMHeadModel, init_params
    from rljax.models.auto import AutoModelForCausalLMWithValueHead

    tokenizer = tiny_tokenizer
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    module = GPT2LMHeadModel(cfg)
    model = AutoModelForCausalLMWithValueHead.from_lm(module, init_params(module, jax.random.PRNGKey(0)))
    generation_config = GenerationConfig(min_length=-1, top_k=0.0, top_p=1.0, do_sample=True,
                                         pad_token_id=tokenizer.eos_token_id)
    return model, tokenizer, generation_config


def test_different_input_types(setup):
    model, tokenizer, generation_config = setup
    best_of_n = BestOfNSampler(model, tokenizer, queries_to_scores, length_sampler=LengthSampler(2, 6),
                               generation_config=generation_config)
    queries = ["hello world", "goodbye world"]
    tokenized_queries = [tokenizer.encode(query) for query in queries]
    various_queries_formats = [
        (tokenized_queries[0], 1),
        (tokenized_queries, 2),
        (torch.tensor(tokenized_queries[1]), 1),
        ([torch.tensor(query) for query in tokenized_queries], 2),
        (np.asarray(tokenized_queries[0]), 1),
        ([jnp.asarray(query) for query in tokenized_queries], 2),
    ]
    for q, expected_length in various_queries_formats:
        results = best_of_n.generate(q)
        assert isinstance(results, list)
        assert len(results) == expected_length


def test_different_sample_sizes_and_n_candidates_values(setup):
    model, tokenizer, generation_config = setup
    for sample_value, n_candidates_values, expected in [(4, 2, 2), (10, 3, 3), (6, 4, 4)]:
        best_of_n = BestOfNSampler(model, tokenizer, queries_to_scores, length_sampler=LengthSampler(6, 10),
                                   generation_config=generation_config, sample_size=sample_value,
                                   n_candidates=n_candidates_values)
        tokenized_queries = [tokenizer.encode(query) for query in ["hello world", "troll the world"]]
        results = best_of_n.generate(tokenized_queries)
        for result in results:
            assert len(result) == expected


def test_one_generation_call_for_all_queries_and_samples_and_the_best_win(setup, monkeypatch):
    model, tokenizer, generation_config = setup
    calls = []
    original = type(model).generate

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(type(model), "generate", counting)
    seen = []

    def score_by_length(texts):  # a deterministic scorer: longer text = better
        seen.extend(texts)
        return [len(t) for t in texts]

    lengths = iter([3, 5])
    best_of_n = BestOfNSampler(model, tokenizer, score_by_length, length_sampler=lambda: next(lengths),
                               generation_config=generation_config, sample_size=6, n_candidates=2, seed=1)
    queries = [tokenizer.encode("hello world"), tokenizer.encode("the movie was")]
    results = best_of_n.generate(queries)
    assert len(calls) == 1 and calls[0][0] == 16  # 2 queries x 6 samples, padded to 16 rows, one call
    assert len(seen) == 12
    for i, (query, result) in enumerate(zip(["hello world", "the movie was"], results)):
        mine = seen[6 * i : 6 * (i + 1)]
        assert all(t.startswith(query) for t in mine)  # texts are query + sample, as TRL decodes
        assert [len(t) for t in result] == sorted((len(t) for t in mine), reverse=True)[:2]
    # the same seed gives the same samples
    lengths = iter([3, 5])
    again = BestOfNSampler(model, tokenizer, score_by_length, length_sampler=lambda: next(lengths),
                           generation_config=generation_config, sample_size=6, n_candidates=2, seed=1)
    assert again.generate(queries) == results


def test_jax_scorer_on_tokens(setup):
    model, tokenizer, generation_config = setup
    target = tokenizer.encode(" great")[0]

    @jax.jit
    def count_target(sequences, mask):  # [B, L], [B, L] -> [B]
        return jnp.sum((sequences == target) * mask, axis=1).astype(jnp.float32)

    best_of_n = BestOfNSampler(model, tokenizer, count_target, length_sampler=LengthSampler(8, 9),
                               generation_config=generation_config, sample_size=8, n_candidates=3, score_tokens=True)
    results = best_of_n.generate([tokenizer.encode("the movie was")])
    assert len(results) == 1 and len(results[0]) == 3
    counts = [t.count(" great") for t in results[0]]
    assert counts == sorted(counts, reverse=True)

    new_tokens = []

    def record(sequences, mask):
        new_tokens.append(np.asarray(mask).sum(axis=1))
        return jnp.zeros(sequences.shape[0])

    lengths = iter([3, 5])
    best_of_n = BestOfNSampler(model, tokenizer, record, length_sampler=lambda: next(lengths),
                               generation_config=generation_config, sample_size=4, score_tokens=True)
    queries = [tokenizer.encode("hello world"), tokenizer.encode("the movie was")]
    best_of_n.generate(queries)
    # each query's samples stop at its own drawn length (3, then 5 new tokens; eos may end them sooner)
    drawn = new_tokens[0] - np.repeat([len(q) for q in queries], 4)
    assert (drawn[:4] <= 3).all() and (drawn[4:] <= 5).all() and drawn.max() >= 1


def test_bad_arguments(setup):
    model, tokenizer, generation_config = setup
    with pytest.raises(ValueError, match="n_candidates"):
        BestOfNSampler(model, tokenizer, queries_to_scores, LengthSampler(2, 6), sample_size=2, n_candidates=3)
    with pytest.raises(ValueError, match="tokenizer must be"):
        BestOfNSampler(model, object(), queries_to_scores, LengthSampler(2, 6))
    with pytest.raises(ValueError, match="model must be"):
        BestOfNSampler(object(), tokenizer, queries_to_scores, LengthSampler(2, 6))
    best_of_n = BestOfNSampler(model, tokenizer, lambda texts: [1.0], LengthSampler(2, 6),
                               generation_config=generation_config)
    with pytest.raises(ValueError, match="scores for 4 texts"):
        best_of_n.generate(tokenizer.encode("hello world"))
    with pytest.raises(ValueError, match="1-D"):
        best_of_n.generate(np.zeros((1, 2, 3), np.int32))
