"""T5 (rljax.models.t5, rljax.models.seq2seq) against transformers' PyTorch T5ForConditionalGeneration.

Two tiny variants: T5 v1.0 (ReLU FFN, tied head with the d_model**-0.5 scaling, 3 decoder
blocks over 2 encoder blocks) and v1.1 / flan-t5 (gated-GELU, untied lm_head, no scaling).
Small bucket settings (8 buckets, max distance 20) so 30-token inputs reach the log buckets.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rljax.models import from_pretrained, save_pretrained
from rljax.models.hub import load_state_dict
from rljax.models.seq2seq import seq2seq_generate
from rljax.models.t5 import T5Config, make_decoder_cache, relative_position_bucket

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=3),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
_BUILT = {}


def build_torch_t5(name: str, seed: int = 0):
    """A tiny random transformers T5 with every weight perturbed; v1.1 gets its own lm_head
    (transformers 5 ties the head whatever the constructor says, and unties it on load when
    the checkpoint holds a different lm_head.weight)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**SMALL, **VARIANTS[name])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if not VARIANTS[name]["tie_word_embeddings"]:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def _build(name, tmp_path_factory):
    if name not in _BUILT:
        torch_model = build_torch_t5(name)
        path = tmp_path_factory.mktemp(f"t5_{name}")
        torch_model.save_pretrained(path)
        model, params = from_pretrained(str(path))
        _BUILT[name] = (name, torch_model, str(path), model, params)
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


def padded_batch(seed=0):
    """Encoder ids/mask [3, 30] (right-, left- and un-padded rows) and decoder ids/mask [3, 7]
    (start token first, right-padded)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, VOCAB, (3, 30))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, :12] = 0
    ids[mask == 0] = 0
    dec = rs.randint(2, VOCAB, (3, 7))
    dec[:, 0] = 0
    dmask = np.ones_like(dec)
    dmask[2, 4:] = 0
    dec[dmask == 0] = 0
    return ids, mask, dec, dmask


def torch_logits(model, ids, mask, dec, dmask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                     decoder_attention_mask=torch.tensor(dmask)).logits.numpy()


_apply = jax.jit(lambda module, p, *a: module.apply({"params": p}, *a), static_argnums=0)


def rljax_logits(model, params, ids, mask, dec, dmask):
    return np.asarray(_apply(model, params, *(jnp.asarray(x) for x in (ids, mask, dec, dmask))).logits)


def _max_diff(a, b, dmask):
    return float(np.abs(a - b)[dmask.astype(bool)].max())


def test_config_flags_follow_the_checkpoint(t5):
    name, _, path, model, params = t5
    cfg = model.config
    assert cfg.is_gated_act == (name == "v1_1")
    assert cfg.tie_word_embeddings == cfg.scale_decoder_outputs == (name == "v1_0")
    assert ("lm_head" in params) == (name == "v1_1")
    assert cfg.num_decoder_layers == (3 if name == "v1_0" else 2)


def test_logits_match_transformers_on_padded_batch(t5):
    _, torch_model, _, model, params = t5
    ids, mask, dec, dmask = padded_batch()
    ours = rljax_logits(model, params, ids, mask, dec, dmask)
    assert ours.shape == (3, 7, VOCAB)
    assert _max_diff(ours, torch_logits(torch_model, ids, mask, dec, dmask), dmask) < 1e-4


def test_relative_position_buckets_equal_transformers():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, bidirectional, nb, md)
            ours = relative_position_bucket(jnp.asarray(rel.numpy(), jnp.int32), bidirectional, nb, md)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_cached_decode_equals_uncached_forward(t5):
    _, _, _, model, params = t5
    ids, mask, dec, dmask = padded_batch(seed=2)
    dmask = np.ones_like(dec)
    full = rljax_logits(model, params, ids, mask, dec, dmask)

    enc = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=type(model).encode)
    cache = jax.jit(make_decoder_cache, static_argnums=(0, 3, 4))(model, params, enc, 3, dec.shape[1])
    step = jax.jit(lambda p, tok, slots, c: model.apply({"params": p}, tok, slots, None, jnp.asarray(mask), c,
                                                        method=type(model).decode))
    slots = np.zeros((3, dec.shape[1]), np.int32)
    got = []
    for t in range(dec.shape[1]):  # one compiled step, fed one token at a time
        slots[:, t] = 1
        logits, _, cache = step(params, jnp.asarray(dec[:, t:t + 1]), jnp.asarray(slots), cache)
        got.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), full, atol=5e-5)  # v1_1: an unscaled randn lm_head, logits ~10


@pytest.mark.parametrize("eos", [None, 1])
def test_greedy_generation_equals_transformers_generate(t5, eos):
    name, torch_model, _, model, params = t5
    rs = np.random.RandomState(1)
    ids = rs.randint(2, VOCAB, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    out = seq2seq_generate(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                           max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        # transformers 5's encoder-decoder cache assumes as many decoder as encoder blocks (v1_0 has 3 vs 2)
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=10, eos_token_id=eos, pad_token_id=0,
                                   use_cache=name != "v1_0").numpy()
    seqs = np.asarray(out.sequences)
    np.testing.assert_array_equal(seqs[:, : ref.shape[1]], ref)
    assert (seqs[:, ref.shape[1]:] == 0).all()
    assert (seqs[:, 0] == 0).all() and np.asarray(out.response_mask)[:, 0].all()


def test_rljax_save_loads_in_transformers_with_same_logits(t5, tmp_path):
    name, _, _, model, params = t5
    save_pretrained(model, params, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == "t5" and cfg["tie_word_embeddings"] == (name == "v1_0")
    names = set(load_state_dict(str(tmp_path)))
    assert ("lm_head.weight" in names) == (name == "v1_1") and "shared.weight" in names
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec, dmask = padded_batch(seed=3)
    ours = rljax_logits(model, params, ids, mask, dec, dmask)
    assert _max_diff(ours, torch_logits(reloaded, ids, mask, dec, dmask), dmask) < 1e-4
    _, params2 = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_config_errors_and_transformers5_untied_configs():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-relu-x")
    # transformers 5 writes a loaded v1.1 checkpoint as tie_word_embeddings=true + scale_decoder_outputs=false
    cfg = T5Config.from_dict({"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
    assert T5Config.from_dict({"model_type": "t5", "tie_word_embeddings": False}).to_dict()["tie_word_embeddings"] is False


def test_sharding_rules_split_heads_and_mlp(t5):
    from rljax.sharding import infer_family, make_mesh, partition_specs

    name, _, _, _, params = t5
    assert infer_family(params) == "t5"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    block = specs["decoder"]["block_0"]
    assert tuple(block["layer_0"]["SelfAttention"]["q"]["kernel"]) == ("fsdp", "model")
    assert tuple(block["layer_1"]["EncDecAttention"]["o"]["kernel"]) == ("model", "fsdp")
    assert tuple(block["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"]) == (None, "model")
    ff = block["layer_2"]["DenseReluDense"]
    assert tuple(ff["wi" if name == "v1_0" else "wi_1"]["kernel"]) == ("fsdp", "model")
    assert tuple(ff["wo"]["kernel"]) == ("model", "fsdp")
    assert tuple(specs["shared"]["embedding"]) == ("model", "fsdp")
    assert tuple(block["layer_0"]["layer_norm"]["weight"]) == ()


@pytest.mark.slow
def test_value_head_ppo_step_runs_sharded_on_a_data_fsdp_mesh(tmp_path_factory):
    """A T5 value-head PPO step (TRL's encoder-decoder layout) jitted on a data=2 x fsdp=4 mesh of
    the 8 CPU devices: params and Adam moments are split on fsdp, and the step's numbers equal
    the single-device step's."""
    from rljax.models.auto import AutoModelForSeq2SeqLMWithValueHead
    from rljax.models.seq2seq import make_seq2seq_forward_rollout
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import PPOTrainState, make_ppo_step
    from rljax.sharding import batch_sharding, jit_sharded, make_mesh, replicated
    from rljax.trainers.base import shard_state_for_mesh

    _, _, path, _, _ = _build("v1_1", tmp_path_factory)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(path, summary_dropout_prob=0.0)
    config = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-3, seed=0)
    rs = np.random.RandomState(0)
    q = rs.randint(2, VOCAB, (8, 6)).astype(np.int32)
    qm = (np.arange(6)[None] < rs.randint(2, 7, (8, 1))).astype(np.int32)
    r = np.concatenate([np.zeros((8, 1), np.int32), rs.randint(2, VOCAB, (8, 5))], axis=1).astype(np.int32)
    rm = (np.arange(6)[None] < rs.randint(3, 7, (8, 1))).astype(np.int32)
    scores = jnp.asarray(rs.normal(size=(8,)), jnp.float32)
    view, forward = make_seq2seq_forward_rollout(model.module, 6)
    rollout = jax.jit(forward)(model.params, model.params, q, qm, r, rm)

    def fresh_state():
        params = jax.tree.map(jnp.array, model.params)
        return PPOTrainState.create(params, jax.tree.map(jnp.array, params), config)

    mesh = make_mesh(data=2, fsdp=4)
    state, sh = shard_state_for_mesh(fresh_state(), mesh, 8, "the batch")
    kernel = state.params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
    assert "fsdp" in tuple(kernel.sharding.spec) and kernel.addressable_shards[0].data.shape == (8, 32)
    rows = batch_sharding(mesh)
    step = jit_sharded(make_ppo_step(view, config), mesh, in_shardings=(sh, rows, rows),
                       out_shardings=(sh, replicated(mesh)), donate_argnums=(0,))
    new_state, stats = step(state, rollout, scores)
    assert tuple(new_state.params["shared"]["embedding"].sharding.spec) == tuple(sh.params["shared"]["embedding"].spec)
    one_state, one_stats = jax.jit(make_ppo_step(view, config))(fresh_state(), rollout, scores)
    for key in ("ppo/loss/total", "ppo/loss/value", "ppo/policy/entropy"):
        np.testing.assert_allclose(float(stats[key]), float(one_stats[key]), rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(new_state.params["v_head"]["summary"]["kernel"]),
                               np.asarray(one_state.params["v_head"]["summary"]["kernel"]), rtol=1e-4, atol=1e-5)
