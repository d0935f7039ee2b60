"""Checks every causal model family runs against transformers' PyTorch model (used by
tests/test_family_*.py): logits on a left-padded batch, cached decoding, greedy generation,
save -> transformers load, the score head, and one PPO and one DPO step.

Each reference is a tiny random transformers model with every weight perturbed away from its
init (so biases and norm weights matter), saved with ``save_pretrained(safe_serialization=True)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from rljax.generation import generate
from rljax.models import from_pretrained, save_pretrained
from rljax.models.heads import lm_params, sequence_score_from_pretrained, value_head_model_from_pretrained

PAD = 0


def build_torch_lm(hf_config, seed: int = 0):
    """A tiny random transformers causal LM with every weight perturbed (eager attention, eval mode)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def left_padded_batch(vocab: int, seed: int = 0, seq: int = 12, pads=(0, 4, 7)):
    """(ids, mask, position_ids) [3, seq] numpy, rows left-padded by ``pads`` tokens."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, (len(pads), seq))
    mask = np.ones((len(pads), seq), np.int64)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = PAD
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def torch_logits(model, ids, mask, pos=None):
    kw = {} if pos is None else {"position_ids": torch.tensor(pos)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.float().numpy()


def max_diff_on_real_tokens(a, b, mask) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


def rljax_logits(model, params, ids, mask):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)


def check_logits(torch_model, path: str, vocab: int, pass_positions: bool = True):
    """rljax logits == transformers' on real tokens of a left-padded batch (fp32, 1e-4)."""
    model, params = from_pretrained(path)
    ids, mask, pos = left_padded_batch(vocab)
    ours = rljax_logits(model, params, ids, mask)
    assert ours.shape == (*ids.shape, vocab)
    ref = torch_logits(torch_model, ids, mask, pos if pass_positions else None)
    assert max_diff_on_real_tokens(ours, ref, mask) < 1e-4
    return model, params


def check_cached_decode(model, params, vocab: int):
    """Prefill 6 tokens into a cache, then decode one token at a time == one uncached forward."""
    ids, mask, _ = left_padded_batch(vocab, seq=10, pads=(0, 3, 5))
    full = rljax_logits(model, params, ids, mask)
    prompt_len, max_len = 6, 12
    cache = model.init_cache(3, max_len)
    cache_mask = np.zeros((3, max_len), np.int32)
    cache_mask[:, :prompt_len] = mask[:, :prompt_len]
    step = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, m, cache=c))
    out = step(params, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(cache_mask), cache)
    got, cache = [out.logits], out.cache
    for t in range(prompt_len, 10):
        cache_mask[:, t] = 1
        out = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(cache_mask), cache)
        got.append(out.logits)
        cache = out.cache
    assert max_diff_on_real_tokens(jnp.concatenate(got, axis=1), full, mask) < 1e-5


def check_greedy_generation(torch_model, model, params, vocab: int, max_new_tokens: int = 8):
    """rljax greedy generation == transformers' ``generate`` token for token (left-padded prompts)."""
    ids, mask, _ = left_padded_batch(vocab, seed=1, seq=7, pads=(0, 3, 5))
    out = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = torch_model.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, use_cache=True,
            max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=None,
        ).numpy()
    np.testing.assert_array_equal(np.asarray(out.sequences), expected)


def check_save_roundtrip(model, params, tmp_path, architecture: str, vocab: int):
    """rljax save -> transformers loads the same logits; rljax reads its own files back exactly."""
    save_pretrained(model, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == architecture
    ids, mask, pos = left_padded_batch(vocab)
    assert max_diff_on_real_tokens(rljax_logits(model, params, ids, mask), torch_logits(reloaded, ids, mask, pos),
                                   mask) < 1e-4
    _, params2 = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def check_score_head(path: str, tmp_path, architecture: str, vocab: int):
    """Sequence-score head over the trunk: saved by rljax, transformers' ``*ForSequenceClassification``
    loads it and scores the left-padded batch alike."""
    module, params = sequence_score_from_pretrained(path, num_labels=1)
    ids, mask, pos = left_padded_batch(vocab)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    save_pretrained(module, params, str(tmp_path))
    hf = getattr(transformers, architecture).from_pretrained(tmp_path, attn_implementation="eager").eval()
    hf.config.pad_token_id = PAD  # HF finds each row's last token by pad id; rows are left-padded
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def check_ppo_step(path: str, vocab: int):
    """One ``make_ppo_step`` on a tiny rollout with a value head: finite stats, params move."""
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import PPOTrainState, make_forward_rollout, make_ppo_step

    module, params = value_head_model_from_pretrained(path, summary_dropout_prob=0.0)
    rs = np.random.RandomState(0)
    queries = jnp.asarray(rs.randint(3, vocab, (4, 5)), jnp.int32)
    query_mask = jnp.asarray([[1] * 5, [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1] * 5], jnp.int32)
    responses = jnp.asarray(rs.randint(3, vocab, (4, 4)), jnp.int32)
    response_mask = jnp.asarray([[1] * 4, [1, 1, 1, 0], [1, 1, 0, 0], [1] * 4], jnp.int32)
    rollout = jax.jit(make_forward_rollout(module))(params, params, queries, query_mask, responses, response_mask)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3)
    state = PPOTrainState.create(params, params, config)
    new_state, stats = jax.jit(make_ppo_step(module, config))(state, rollout, jnp.asarray([1.0, -1.0, 0.5, 0.0]))
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl"):
        assert np.isfinite(float(stats[key])), key
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, params)
    assert all(jax.tree.leaves(moved["v_head"])) and any(jax.tree.leaves(lm_params(moved)))


def check_dpo_step(path: str, vocab: int):
    """DPO loss and its gradient over chosen/rejected pairs: finite, nonzero gradient."""
    from rljax.dpo import make_dpo_loss, make_reference_logps_fn

    model, params = from_pretrained(path)
    rs = np.random.RandomState(1)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rs.randint(3, vocab, (2, 8)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0  # right-padded, as TRL's collator pads
        labels = np.where(mask > 0, ids, -100)
        labels[:, :3] = -100  # prompt tokens
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ref_c, ref_r = make_reference_logps_fn(model)(params, batch)
    batch.update(reference_chosen_logps=ref_c - 0.1, reference_rejected_logps=ref_r + 0.1)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(make_dpo_loss(model, beta=0.1), has_aux=True))(
        params, batch, None)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
