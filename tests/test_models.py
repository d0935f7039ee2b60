"""rljax.models: Flax GPT-2 / Llama / Mistral / Qwen2 against transformers' PyTorch models,
and HF checkpoint I/O (sharding, bf16, tied/untied embeddings, error messages).

Every reference model is a tiny random transformers model built from a config here,
with all its weights (biases and norm weights included) perturbed away from their init.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from rljax.models import from_pretrained, save_pretrained
from rljax.models.hub import hf_name, load_state_dict, parse_size
from rljax.models.llama import LlamaConfig

VOCAB = 100
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2),
    "gpt2_untied": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "llama_gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama3_rope_tied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "llama_linear_bias_headdim": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_dynamic": lambda: transformers.LlamaConfig(
        **{**SMALL, "max_position_embeddings": 6}, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "mistral_sliding": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=3),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_sliding": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=True,
                                                      sliding_window=3, max_window_layers=1),
}
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM"}


def build_torch_lm(hf_config, seed=0):
    """A tiny random transformers causal LM with every weight perturbed (eager attention)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def left_padded_batch(seed=0, batch=3, seq=10, pads=(0, 4, 7)):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def torch_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def max_diff_on_real_tokens(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(name, torch model, HF directory written by transformers)."""
    model = build_torch_lm(VARIANTS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def test_logits_match_transformers_on_left_padded_batch(checkpoint):
    _, torch_model, path = checkpoint
    model, params = from_pretrained(path)
    ids, mask, pos = left_padded_batch(seq=12)  # 12 > max_position_embeddings 6 for llama_dynamic
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.shape == (3, 12, VOCAB) and out.logits.dtype == jnp.float32
    assert out.hidden_states.shape == (3, 12, model.config.hidden_size)
    assert max_diff_on_real_tokens(out.logits, torch_logits(torch_model, ids, mask, pos), mask) < 1e-4


def test_cached_prefill_then_decode_equals_uncached_forward(checkpoint):
    name, _, path = checkpoint
    if name == "llama_dynamic":
        pytest.skip("dynamic NTK rescales every call by its longest position, so cached keys differ by design")
    model, params = from_pretrained(path)
    ids, mask, _ = left_padded_batch(seq=10, pads=(0, 3, 5))
    prompt_len, max_len = 6, 12
    full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits

    cache = model.init_cache(3, max_len)
    cache_mask = np.zeros((3, max_len), np.int32)
    cache_mask[:, :prompt_len] = mask[:, :prompt_len]
    step = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, m, cache=c))
    out = step(params, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(cache_mask), cache)
    got = [out.logits]
    cache = out.cache
    for t in range(prompt_len, 10):
        cache_mask[:, t] = 1
        out = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(cache_mask), cache)
        got.append(out.logits)
        cache = out.cache
    assert int(cache["index"]) == 10
    assert max_diff_on_real_tokens(jnp.concatenate(got, axis=1), full, mask) < 1e-5


def test_rljax_save_reloads_in_transformers_with_same_logits(checkpoint, tmp_path):
    name, _, path = checkpoint
    model, params = from_pretrained(path)
    save_pretrained(model, params, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == [ARCH[cfg["model_type"]]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == ARCH[cfg["model_type"]]
    ids, mask, pos = left_padded_batch(seq=12)
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert max_diff_on_real_tokens(ours, torch_logits(reloaded, ids, mask, pos), mask) < 1e-4
    # and rljax reads its own files back bit-exactly
    _, params2 = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_tied_models_store_no_lm_head_and_untied_models_do(tmp_path_factory):
    for name, tied in [("qwen2_tied", True), ("qwen2", False), ("gpt2", True), ("gpt2_untied", False)]:
        path = tmp_path_factory.mktemp(name)
        build_torch_lm(VARIANTS[name]()).save_pretrained(path)
        model, params = from_pretrained(str(path))
        assert ("lm_head" in params) is (not tied), name
        out = tmp_path_factory.mktemp(name + "_rljax")
        save_pretrained(model, params, str(out))
        assert ("lm_head.weight" in load_state_dict(str(out))) is (not tied), name


def test_flax_paths_map_one_to_one_onto_hf_names():
    assert hf_name(("model", "layers_0", "self_attn", "q_proj", "kernel")) == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name(("model", "layers_11", "input_layernorm", "weight")) == "model.layers.11.input_layernorm.weight"
    assert hf_name(("transformer", "h_3", "ln_1", "scale")) == "transformer.h.3.ln_1.weight"
    assert hf_name(("model", "embed_tokens", "embedding")) == "model.embed_tokens.weight"


def test_llama_param_names_equal_transformers_state_dict(checkpoint):
    _, torch_model, path = checkpoint
    _, params = from_pretrained(path)
    ours = {hf_name(p) for p in flatten_dict(params)}
    theirs = {k for k in torch_model.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if torch_model.config.tie_word_embeddings:
        theirs.discard("lm_head.weight")
    assert ours == theirs


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope_tied", "llama_linear_bias_headdim", "mistral_sliding",
                                  "qwen2", "qwen2_sliding"])
def test_llama_config_round_trips_through_transformers(name):
    hf = VARIANTS[name]()
    ours = LlamaConfig.from_dict(hf.to_dict())
    assert ours.model_type == hf.model_type
    back = transformers.AutoConfig.for_model(**ours.to_dict())
    assert type(back) is type(hf)
    assert LlamaConfig.from_dict(back.to_dict()) == ours
    assert ours.num_key_value_heads == hf.num_key_value_heads
    assert ours.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert ours.to_dict()["architectures"] == [ARCH[hf.model_type]]


def test_llama_config_reads_legacy_rope_fields_and_rejects_unknown_rope_types():
    cfg = LlamaConfig.from_dict({"model_type": "llama", "rope_theta": 5e5,
                                 "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_type == "linear" and cfg.rope_scaling_dict["factor"] == 4.0
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_dict({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig.from_dict({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="multiple of"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    assert hash(cfg)  # hashable: flax modules and jit static args need it


def test_qwen2_biases_only_on_qkv_and_mistral_has_none():
    qwen = LlamaConfig.from_dict(VARIANTS["qwen2"]().to_dict())
    mistral = LlamaConfig.from_dict(VARIANTS["mistral_sliding"]().to_dict())
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias) == (True, False, False)
    assert (mistral.qkv_bias, mistral.o_bias, mistral.mlp_bias) == (False, False, False)
    assert [mistral.layer_sliding_window(i) for i in range(2)] == [3, 3]
    qs = LlamaConfig.from_dict(VARIANTS["qwen2_sliding"]().to_dict())
    assert [qs.layer_sliding_window(i) for i in range(2)] == [None, 3]


# --- checkpoint files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = build_torch_lm(VARIANTS["llama_gqa"]())
    path = tmp_path_factory.mktemp("llama_io")
    model.save_pretrained(path)
    return model, str(path)


def test_sharded_save_writes_index_and_loads_in_rljax_and_transformers(llama_dir, tmp_path):
    torch_model, path = llama_dir
    model, params = from_pretrained(path)
    save_pretrained(model, params, str(tmp_path), max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in files
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    _, params2 = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, pos = left_padded_batch()
    assert max_diff_on_real_tokens(torch_logits(reloaded, ids, mask, pos),
                                   torch_logits(torch_model, ids, mask, pos), mask) < 1e-6
    # overwriting with a single file removes the old shards and index
    with pytest.raises(FileExistsError):
        save_pretrained(model, params, str(tmp_path))
    save_pretrained(model, params, str(tmp_path), overwrite=True)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_transformers_sharded_checkpoint_loads(llama_dir, tmp_path):
    torch_model, _ = llama_dir
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model, params = from_pretrained(str(tmp_path))
    ids, mask, pos = left_padded_batch()
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert max_diff_on_real_tokens(ours, torch_logits(torch_model, ids, mask, pos), mask) < 1e-4


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("20KB") == 20_000 and parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_size("lots")


def test_bf16_checkpoint_loads_as_bf16_params_and_saves_as_bf16(llama_dir, tmp_path):
    torch_model, path = llama_dir
    bf16_dir = tmp_path / "bf16"
    torch_model.to(torch.bfloat16).save_pretrained(bf16_dir)
    torch_model.float()
    sd = load_state_dict(str(bf16_dir))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())

    model, params = from_pretrained(str(bf16_dir), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    expected = torch_model.state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
                                             np.float32).T, expected)
    ids, mask, pos = left_padded_batch()
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
    ref = torch_logits(torch_model, ids, mask, pos)
    assert max_diff_on_real_tokens(ours, ref, mask) < 0.05 * float(np.abs(ref).max())

    # dtype=None upcasts the bf16 values exactly
    _, params32 = from_pretrained(str(bf16_dir))
    assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params32)

    # rljax writes BF16 tensors that transformers loads as bf16
    out = tmp_path / "rljax_bf16"
    save_pretrained(model, params, str(out))
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    w = reloaded.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.bfloat16
    np.testing.assert_array_equal(w.float().numpy(), expected)


def test_missing_and_unexpected_keys_are_listed(llama_dir, tmp_path):
    from safetensors.numpy import save_file

    _, path = llama_dir
    sd = load_state_dict(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    with pytest.raises(ValueError) as err:
        from_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "missing keys (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected keys (1): ['model.layers.1.mlp.extra_proj.weight']" in msg


def test_shape_mismatch_names_the_tensor(llama_dir, tmp_path):
    _, path = llama_dir
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] = 48
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape"):
        from_pretrained(str(tmp_path))


def test_directory_without_weights_or_config_is_a_clear_error(llama_dir, tmp_path):
    _, path = llama_dir
    with pytest.raises(ValueError, match="No config.json"):
        from_pretrained(str(tmp_path))
    with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match="No model.safetensors or model.safetensors.index.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="re-save them with safetensors"):
        from_pretrained(str(tmp_path))


def test_truncated_weights_file_is_a_clear_error(llama_dir, tmp_path):
    _, path = llama_dir
    with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        from_pretrained(str(tmp_path))


# --- dropout -----------------------------------------------------------------------------------


def test_gpt2_attention_dropout_applies_in_training_only():
    from rljax.models import GPT2Config, init_params
    from rljax.models.attention import dot_product_attention
    from rljax.models.gpt2 import GPT2LMHeadModel

    # only attn_pdrop is on, so any train/eval difference comes from attention dropout
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.3)
    model = GPT2LMHeadModel(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, VOCAB, (2, 8)))
    run = jax.jit(lambda rng, det: model.apply({"params": params}, ids, deterministic=det,
                                                rngs={"dropout": rng}).logits, static_argnums=1)
    evaluated = run(jax.random.PRNGKey(1), True)
    np.testing.assert_array_equal(evaluated, run(jax.random.PRNGKey(2), True))
    train_a, train_b = run(jax.random.PRNGKey(1), False), run(jax.random.PRNGKey(2), False)
    assert not np.allclose(train_a, evaluated) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, run(jax.random.PRNGKey(1), False))

    # inverted dropout on the probabilities: unbiased, zeros at the rate, survivors scaled by 1/(1-p)
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(1, 4, 2, 8), jnp.float32) for _ in range(3))
    bias = jnp.zeros((1, 1, 4, 4))
    exact, no_rng, dropped = jax.jit(lambda keys: (
        dot_product_attention(q, k, v, bias), dot_product_attention(q, k, v, bias, 0.3, None),
        jax.vmap(lambda r: dot_product_attention(q, k, v, bias, 0.3, r))(keys)))(
        jax.random.split(jax.random.PRNGKey(0), 4000))
    np.testing.assert_allclose(dropped.mean(0), exact, atol=0.05)
    np.testing.assert_array_equal(no_rng, exact)


def test_llama_attention_dropout_applies_in_training_only():
    from rljax.models import init_params
    from rljax.models.llama import LlamaForCausalLM

    def logits_fn(rate):
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                          attention_dropout=rate)
        model = LlamaForCausalLM(cfg)
        params = init_params(model, jax.random.PRNGKey(0))
        return jax.jit(lambda rng, det: model.apply({"params": params}, ids, deterministic=det,
                                                    rngs={"dropout": rng}).logits, static_argnums=1)

    ids = jnp.asarray(np.random.RandomState(0).randint(3, VOCAB, (2, 8)))
    run = logits_fn(0.3)
    evaluated = run(jax.random.PRNGKey(1), True)
    np.testing.assert_array_equal(evaluated, run(jax.random.PRNGKey(2), True))
    train_a, train_b = run(jax.random.PRNGKey(1), False), run(jax.random.PRNGKey(2), False)
    assert not np.allclose(train_a, evaluated) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, run(jax.random.PRNGKey(1), False))
    # the default (0, every released checkpoint): training logits are the eval logits, same params
    off = logits_fn(0.0)
    np.testing.assert_array_equal(off(jax.random.PRNGKey(1), False), off(jax.random.PRNGKey(1), True))
    np.testing.assert_array_equal(off(jax.random.PRNGKey(1), True), evaluated)
