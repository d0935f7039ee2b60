"""rljax.generation: HF parity (greedy, eos, min_new_tokens), sampling correctness,
determinism, no retracing, logprob/value bookkeeping, TRL helpers and input errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from rljax import generation as G
from rljax.core import LengthSampler
from rljax.generation import (
    filter_logits,
    generate,
    make_generate_fn,
    respond_to_batch,
    sample_logits,
    strip_responses,
)

VOCAB = 100
PAD = 0


def _hf_tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A larger init than HF's 0.02 keeps logits well separated, so greedy
    # argmax does not hinge on float32 rounding differences between frameworks.
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=2,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(hf_model, rljax module, params) for one tiny random GPT-2."""
    from rljax.models import from_pretrained

    hf = _hf_tiny_gpt2()
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(path)
    model, params = from_pretrained(str(path))
    return hf, model, params


def _left_padded(rows, width):
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


PROMPTS = [[5, 17, 42, 8, 23, 61, 7], [11, 3, 90, 14], [33, 2]]


@pytest.fixture(scope="module")
def prompts():
    return _left_padded(PROMPTS, 7)


def _hf_generate(hf, ids, mask, **kw):
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, use_cache=True, pad_token_id=PAD, **kw,
        )
    return out.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, attention_mask=mask))


def _full_forward(model, params, sequences, mask):
    """A cache-free forward over whole sequences: the reference for cached decoding."""
    return _jitted_apply(model)(params, jnp.asarray(sequences), jnp.asarray(mask))


def _full_forward_logits(model, params, sequences, mask):
    return _full_forward(model, params, sequences, mask).logits


# ---------------------------------------------------------------- HF parity


def test_greedy_matches_hf_on_left_padded_batch(gpt2, prompts):
    hf, model, params = gpt2
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12, do_sample=False)
    expected = _hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.sequences), expected)
    assert out.sequences.shape == (3, 7 + 12)
    np.testing.assert_array_equal(np.asarray(out.response_mask), 1)
    # HF itself handles left padding (positions from the mask): the padded batch
    # equals generating each prompt alone, unpadded.
    for i, row in enumerate(PROMPTS):
        alone = _hf_generate(hf, np.array([row]), np.ones((1, len(row))), max_new_tokens=12, eos_token_id=None)
        np.testing.assert_array_equal(alone[0, len(row):], expected[i, 7:])


@pytest.mark.parametrize("min_new_tokens", [0, 2])
def test_eos_stops_rows_pads_after_and_matches_hf(gpt2, prompts, min_new_tokens):
    hf, model, params = gpt2
    ids, mask = prompts
    free = np.asarray(generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12,
                               do_sample=False).sequences)[:, 7:]
    # a token the greedy path emits early; with min_new_tokens=2 it is blocked at step 1 of row 2
    eos = int(free[2, 1]) if min_new_tokens else int(free[0, 2])
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12, do_sample=False,
                   eos_token_id=eos, pad_token_id=PAD, min_new_tokens=min_new_tokens)
    resp = np.asarray(out.sequences)[:, 7:]
    rmask = np.asarray(out.response_mask)
    stopped = 0
    for i in range(3):
        hits = [t for t in range(min_new_tokens, 12) if resp[i, t] == eos]
        if hits:
            stopped += 1
            first = hits[0]
            assert np.all(resp[i, first + 1:] == PAD)
            np.testing.assert_array_equal(rmask[i], np.arange(12) <= first)
        else:
            np.testing.assert_array_equal(rmask[i], 1)
        assert eos not in resp[i, :min_new_tokens]
    assert stopped >= 1
    expected = _hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=eos, min_new_tokens=min_new_tokens)
    width = expected.shape[1]  # HF stops early when every row is done; we always return the full width
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, :width], expected)
    assert np.all(np.asarray(out.sequences)[:, width:] == PAD)


def test_min_new_tokens_blocks_immediate_eos(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    first = np.asarray(generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12,
                                do_sample=False).sequences)[:, 7]
    eos = int(first[0])  # greedy row 0 would stop at once
    short = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12, do_sample=False,
                     eos_token_id=eos, pad_token_id=PAD)
    assert np.asarray(short.response_mask)[0].sum() == 1
    out = generate(model, params, ids, mask, jax.random.PRNGKey(3), max_new_tokens=12, do_sample=True,
                   eos_token_id=eos, pad_token_id=PAD, min_new_tokens=6, top_k=3)
    resp = np.asarray(out.sequences)[:, 7:]
    assert not np.any(resp[:, :6] == eos)
    assert np.all(np.asarray(out.response_mask)[:, :6] == 1)


# ---------------------------------------------------------------- sampling


def _many_rows(n, width=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=n)
    rows = [rng.integers(1, VOCAB, size=n_tok).tolist() for n_tok in lengths]
    return _left_padded(rows, width)


def test_top_k_never_samples_outside_top_k(gpt2):
    _, model, params = gpt2
    ids, mask = _many_rows(64)
    out = generate(model, params, ids, mask, jax.random.PRNGKey(1), max_new_tokens=8, top_k=3)
    seq = np.asarray(out.sequences)
    full_mask = np.concatenate([mask, np.ones((64, 8), np.int32)], axis=1)
    logits = np.asarray(_full_forward_logits(model, params, seq, full_mask))
    for t in range(8):
        step_logits = logits[:, 5 - 1 + t]
        kth = np.sort(step_logits, axis=-1)[:, -3]
        chosen = np.take_along_axis(step_logits, seq[:, 5 + t, None], axis=-1)[:, 0]
        assert np.all(chosen >= kth)
    assert len(np.unique(seq[:, 5:])) > 3  # it does sample, not just argmax


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_match_softmax(gpt2, temperature):
    _, model, params = gpt2
    n = 4000
    ids = np.tile(np.array([[5, 17, 42]], np.int32), (n, 1))
    out = generate(model, params, ids, np.ones_like(ids), jax.random.PRNGKey(7), max_new_tokens=1,
                   temperature=temperature)
    counts = np.bincount(np.asarray(out.sequences)[:, -1], minlength=VOCAB)
    logits = np.asarray(_full_forward_logits(model, params, ids[:1], np.ones((1, 3))))[0, -1]
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    expected = probs * n
    big = expected >= 5  # pool rare tokens into one bin, as chi-square needs
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert exp[-1] > 0 or obs[-1] == 0
    keep = exp > 0
    pvalue = scipy.stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert pvalue > 1e-3, (pvalue, obs, exp)


def _hf_style_top_p(logits, top_p):
    """HF's TopPLogitsWarper, restated in numpy: sort ascending, drop tokens whose
    ascending cumulative probability is <= 1 - top_p, always keep the top token."""
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    p = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    remove_sorted = np.cumsum(p, axis=-1) <= 1 - top_p
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return remove


def test_filter_logits_top_p_matches_hf_semantics():
    probs = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = lambda p: np.isfinite(np.asarray(filter_logits(jnp.asarray(probs), top_p=p)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(0.1), [1, 0, 0, 0])  # the top token always stays
    np.testing.assert_array_equal(kept(0.7), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0.9), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(1.0), [1, 1, 1, 1])
    logits = np.random.default_rng(0).normal(size=(256, 50)).astype(np.float32) * 2
    for top_p in (0.3, 0.8, 0.95):
        ours = ~np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_p=top_p)))
        np.testing.assert_array_equal(ours, _hf_style_top_p(logits, top_p))
    # top-k then top-p, with temperature, composes in HF's order
    filtered = np.asarray(filter_logits(jnp.asarray(logits), temperature=0.7, top_k=5, top_p=0.9))
    assert np.all(np.isfinite(filtered).sum(-1) <= 5)
    k_only = np.where(logits >= np.sort(logits, -1)[:, -5:-4], logits / 0.7, -np.inf)
    np.testing.assert_array_equal(np.isinf(filtered), np.isinf(k_only) | _hf_style_top_p(k_only, 0.9))


def test_top_p_sampling_stays_in_nucleus(gpt2):
    _, model, params = gpt2
    ids, mask = _many_rows(512, seed=1)
    out = generate(model, params, ids, mask, jax.random.PRNGKey(2), max_new_tokens=1, top_p=0.6)
    logits = np.asarray(_full_forward_logits(model, params, ids, mask))[:, -1]
    outside = _hf_style_top_p(logits, 0.6)
    chosen = np.asarray(out.sequences)[:, -1]
    assert not np.any(np.take_along_axis(outside, chosen[:, None], axis=-1))
    assert np.mean((~outside).sum(-1) > 1) > 0.5  # the nucleus usually has several tokens
    assert np.mean(chosen != logits.argmax(-1)) > 0.1  # and sampling uses them


def test_sample_logits_top_k_one_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (32, 40))
    tokens = sample_logits(logits, jax.random.PRNGKey(1), temperature=2.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))


def test_sample_categorical_frequencies_and_masked_tokens():
    # Inverse-CDF sampling draws softmax(logits): 20k draws (vmap over keys) on V = 8, every
    # token's frequency within 4 sigma of its probability; -inf (masked) tokens, including the
    # first and the last index, are never drawn.
    logits = jnp.array([-jnp.inf, 1.0, -0.5, 2.0, -jnp.inf, 0.0, -3.0, -jnp.inf], jnp.float32)
    n = 20_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: G.sample_categorical(k, logits)))(keys))
    assert draws.dtype == np.int32 and draws.shape == (n,)
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.bincount(draws, minlength=8) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 4 * sigma + 1e-12), (freq, probs)
    assert np.all(freq[probs == 0] == 0)
    # a batch of rows with one key: each row follows its own distribution, one-hot rows are exact
    rows = jnp.full((5, 8), -jnp.inf).at[jnp.arange(5), jnp.array([0, 7, 3, 3, 5])].set(0.0)
    np.testing.assert_array_equal(np.asarray(G.sample_categorical(jax.random.PRNGKey(1), rows)), [0, 7, 3, 3, 5])


# ---------------------------------------------------------------- determinism, retracing, bookkeeping


def test_same_key_same_output_and_different_keys_differ(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    run = lambda k: np.asarray(generate(model, params, ids, mask, jax.random.PRNGKey(k),  # noqa: E731
                                        max_new_tokens=12).sequences)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :7], ids)  # prompt returned as given


def test_no_retrace_on_repeated_calls(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    kw = dict(max_new_tokens=5, top_k=7, eos_token_id=3, pad_token_id=PAD)
    settings = G._settings(do_sample=True, temperature=1.0, top_p=1.0, min_new_tokens=0,
                           return_logprobs=False, return_values=False, cache_dtype=None, **kw)
    before = G.TRACE_COUNTS[settings]
    for seed in range(3):
        generate(model, params, ids, mask, jax.random.PRNGKey(seed), **kw)
    assert G.TRACE_COUNTS[settings] == before + 1
    fn = make_generate_fn(model, **kw)
    assert fn._cache_size() == 1
    fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(9))
    assert fn._cache_size() == 1 and G.TRACE_COUNTS[settings] == before + 1


def test_sampled_lengths_are_a_traced_limit_one_compile(gpt2, prompts):
    """Sampled lengths (a LengthSampler's draws) as ``new_tokens_limit``: 5 calls with different
    lengths compile once; each output keeps the maximum width and equals, up to its limit, a generation with
    ``max_new_tokens=limit`` (same key), with pad and mask 0 past the limit."""
    _, model, params = gpt2
    ids, mask = prompts
    kw = dict(max_new_tokens=8, top_k=5, pad_token_id=PAD)
    fn = make_generate_fn(model, **kw)
    key = jax.random.PRNGKey(4)
    limits = [2, 3, 5, 7, 8]
    before = fn._cache_size()
    for limit in limits:
        out = generate(model, params, ids, mask, key, new_tokens_limit=limit, **kw)
        assert out.sequences.shape == (3, 7 + 8)
        want = generate(model, params, ids, mask, key, **dict(kw, max_new_tokens=limit))
        np.testing.assert_array_equal(np.asarray(out.sequences)[:, : 7 + limit], np.asarray(want.sequences))
        np.testing.assert_array_equal(np.asarray(out.sequences)[:, 7 + limit :], PAD)
        assert np.asarray(out.response_mask)[:, limit:].sum() == 0
    # a direct call with a Python int or a numpy int limit, or with none (= max_new_tokens): the same program
    for limit in (LengthSampler(2, 9, rng=0)(), np.int64(3), None):
        fn(params, jnp.asarray(ids), jnp.asarray(mask), key, limit)
    assert fn._cache_size() == before + 1  # one program for every limit, and for the call without one
    with pytest.raises(ValueError, match="new_tokens_limit=9 must be between 1 and max_new_tokens=8"):
        generate(model, params, ids, mask, key, new_tokens_limit=9, **kw)


def test_prefill_runs_the_lm_head_on_the_last_column_only(gpt2, prompts):
    """nanoGPT's ``lm_head(x[:, [-1]])``: the compiled generation holds no [B, P, V] logits."""
    _, model, params = gpt2
    ids, mask = prompts
    fn = make_generate_fn(model, max_new_tokens=2, do_sample=False, pad_token_id=PAD, jit=False)
    text = jax.jit(fn).lower(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0)).as_text()
    assert f"tensor<3x7x{VOCAB}xf32>" not in text and f"tensor<3x1x{VOCAB}xf32>" in text


def test_logprobs_equal_full_forward_log_softmax(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    # processed distribution differs from the raw one (temperature, top-k), logprobs stay raw
    out = generate(model, params, ids, mask, jax.random.PRNGKey(4), max_new_tokens=10, temperature=0.8,
                   top_k=20, eos_token_id=int(ids[0, -1]), pad_token_id=PAD, return_logprobs=True)
    seq, rmask = np.asarray(out.sequences), np.asarray(out.response_mask)
    full_mask = np.concatenate([mask, rmask], axis=1)
    logp = jax.nn.log_softmax(_full_forward_logits(model, params, seq, full_mask), axis=-1)
    expected = np.take_along_axis(np.asarray(logp)[:, 6:-1], seq[:, 7:, None], axis=-1)[..., 0] * rmask
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-4)


def test_values_align_with_the_predicting_position(gpt2, prompts):
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    _, base, base_params = gpt2
    ids, mask = prompts
    model, params = AutoModelForCausalLMWithValueHead.from_lm(base, base_params, rng=jax.random.PRNGKey(1))
    out = generate(model, params, ids, mask, jax.random.PRNGKey(5), max_new_tokens=6, return_values=True,
                   return_logprobs=True, eos_token_id=int(ids[1, -1]), pad_token_id=PAD)
    seq, rmask = np.asarray(out.sequences), np.asarray(out.response_mask)
    full = _full_forward(model, params, seq, np.concatenate([mask, rmask], 1))
    np.testing.assert_allclose(np.asarray(out.values), np.asarray(full.values)[:, 6:-1] * rmask, atol=1e-4)
    with pytest.raises(ValueError, match="no .values"):
        generate(base, base_params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=2, return_values=True)


def test_generate_fn_composes_inside_an_outer_jit(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    fn = make_generate_fn(model, max_new_tokens=4, return_logprobs=True)

    @jax.jit
    def rollout(params, ids, mask, rng):
        out = fn(params, ids, mask, rng)
        return out.sequences, (out.logprobs * out.response_mask).sum(-1)

    seq, total = rollout(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    direct = fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(seq), np.asarray(direct.sequences))
    assert np.all(np.asarray(total) < 0)


def test_bfloat16_cache_runs(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=3, do_sample=False,
                   cache_dtype=jnp.bfloat16)
    assert out.sequences.shape == (3, 10)


# ---------------------------------------------------------------- TRL helpers


def test_respond_to_batch_returns_txt_len_sampled_tokens(gpt2):
    _, model, params = gpt2
    queries = np.array([[5, 17, 42], [8, 9, 10]], np.int32)
    a = respond_to_batch(model, params, queries, txt_len=6, rng=jax.random.PRNGKey(0))
    b = respond_to_batch(model, params, queries, txt_len=6, rng=jax.random.PRNGKey(0))
    assert a.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    greedy = generate(model, params, queries, None, jax.random.PRNGKey(0), max_new_tokens=6, do_sample=False)
    top1 = respond_to_batch(model, params, queries, txt_len=6, top_k=1, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy.sequences)[:, 3:])
    with pytest.raises(ValueError, match="PRNG key"):
        respond_to_batch(model, params, queries, txt_len=6)


def test_strip_responses_cuts_after_first_eos_in_response_only():
    eos, pad = 2, 2  # pad == eos, and the prompt contains eos (TRL cuts at the first eos of prompt + response)
    seqs = np.array([
        [2, 5, 6, 7, 2, 2, 2],
        [2, 2, 6, 7, 8, 9, 1],
        [5, 2, 6, 2, 2, 2, 2],
    ])
    out = strip_responses(seqs, prompt_len=3, eos_token_id=eos, pad_token_id=pad)
    assert [r.tolist() for r in out] == [[7, 2], [7, 8, 9, 1], [2]]
    raw = strip_responses(seqs, prompt_len=3, eos_token_id=eos, pad_token_id=pad, remove_padding=False)
    assert [r.tolist() for r in raw] == [[7, 2, 2, 2], [7, 8, 9, 1], [2, 2, 2, 2]]
    no_eos = strip_responses(np.array([[4, 5, 0, 0], [4, 5, 6, 7]]), 1, None, 0)
    assert [r.tolist() for r in no_eos] == [[5], [5, 6, 7]]


def test_strip_responses_roundtrip_with_generate(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=12, do_sample=False,
                   eos_token_id=int(ids[0, -1]), pad_token_id=int(ids[0, -1]))
    responses = strip_responses(out.sequences, 7, int(ids[0, -1]), int(ids[0, -1]))
    assert [len(r) for r in responses] == np.asarray(out.response_mask).sum(-1).tolist()


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(max_new_tokens=45), "max_position_embeddings"),
        (dict(input_ids=np.arange(5)), "2-D"),
        (dict(attention_mask=np.ones((3, 6), np.int32)), "attention_mask shape"),
        (dict(attention_mask=np.array([[1, 1, 1, 1, 1, 1, 0]] * 3)), "padding_side = 'left'"),
        (dict(attention_mask=np.zeros((3, 7), np.int32)), "no real tokens"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(temperature=0.0), "do_sample=False"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k"),
        (dict(eos_token_id=3), "pad_token_id=tokenizer.pad_token_id"),
    ],
)
def test_bad_inputs_raise_clear_errors(gpt2, prompts, change, match):
    _, model, params = gpt2
    ids, mask = prompts
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        generate(model, params, rng=jax.random.PRNGKey(0), **kw)


def test_greedy_with_zero_temperature_and_trl_style_float_top_k_is_allowed(gpt2, prompts):
    _, model, params = gpt2
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=2, do_sample=False,
                   temperature=0.0, top_k=0.0)
    assert out.sequences.shape == (3, 9)


# ---------------------------------------------------------------- Llama family (GQA)


def test_llama_gqa_greedy_matches_hf(tmp_path, prompts):
    import torch
    import transformers

    from rljax.models import from_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path))
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(np.asarray(out.sequences), _hf_generate(hf, ids, mask, max_new_tokens=10))
