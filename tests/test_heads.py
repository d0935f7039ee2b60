"""rljax.models.heads: TRL's value head (AutoModelForCausalLMWithValueHead) and the
sequence-score head against transformers' *ForSequenceClassification."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from rljax.models import from_pretrained, save_pretrained
from rljax.models.heads import (
    AutoModelForCausalLMWithValueHead,
    CausalLMWithValueHead,
    SequenceScoreModel,
    ValueHead,
    last_token_index,
    lm_params,
    sequence_score_from_pretrained,
)
from rljax.models.hub import load_state_dict, params_to_state_dict, family_of

VOCAB, PAD = 100, 0
CONFIGS = {
    "gpt2": lambda **kw: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=2, **kw),
    "llama": lambda **kw: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **kw),
}


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(side, seed=0, seq=9, lengths=(9, 5, 2)):
    rs = np.random.RandomState(seed)
    ids = np.full((len(lengths), seq), PAD)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, n in enumerate(lengths):
        sl = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[row, sl] = rs.randint(3, VOCAB, n)  # real tokens never equal PAD
        mask[row, sl] = 1
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm_dir(request, tmp_path_factory):
    cfg = CONFIGS[request.param]()
    torch.manual_seed(0)
    model = perturbed(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))
    path = tmp_path_factory.mktemp(request.param + "_lm")
    model.save_pretrained(path)
    return model, str(path)


# --- value head ------------------------------------------------------------------------------


def test_value_head_outputs_and_trl_state_dict_names(lm_dir):
    torch_model, path = lm_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    module, params = model  # unpacks like a (module, params) pair
    assert isinstance(module, CausalLMWithValueHead)
    ids, mask, pos = padded_batch("left")
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.values.shape == ids.shape and out.values.dtype == jnp.float32
    assert out.logits.shape == (*ids.shape, VOCAB)

    # logits are the LM's (and transformers'); values are summary(last hidden state)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(pos)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(np.asarray(out.logits) - ref)[real].max() < 1e-4
    summary = params["v_head"]["summary"]
    np.testing.assert_allclose(out.values, out.hidden_states @ summary["kernel"][:, 0] + summary["bias"][0], atol=1e-6)

    hidden = module.config.hidden_size
    sd = params_to_state_dict(params, family_of(module.config))
    base_keys = {k for k in torch_model.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if torch_model.config.tie_word_embeddings:
        base_keys.discard("lm_head.weight")
    assert set(sd) == base_keys | {"v_head.summary.weight", "v_head.summary.bias"}
    assert sd["v_head.summary.weight"].shape == (1, hidden) and sd["v_head.summary.bias"].shape == (1,)
    assert set(lm_params(params)) == set(params) - {"v_head"}


def test_value_head_init_strategies_and_dropout():
    hidden = jnp.ones((2, 3, 256))
    default = ValueHead(0.1).init(jax.random.PRNGKey(0), hidden)["params"]["summary"]
    normal = ValueHead(0.1, "normal", 0.2).init(jax.random.PRNGKey(0), hidden)["params"]["summary"]
    assert default["kernel"].shape == (256, 1) and default["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(normal["bias"], 0.0)
    assert 0.17 < float(jnp.std(normal["kernel"])) < 0.23
    # TRL's random init is torch nn.Linear's: kernel AND bias uniform(-1/sqrt(256), 1/sqrt(256))
    bound = 1 / 16
    assert float(jnp.abs(default["kernel"]).max()) <= bound and float(jnp.std(default["kernel"])) > 0.6 * bound / 3**0.5
    assert default["bias"].shape == (1,) and 0 < float(jnp.abs(default["bias"][0])) <= bound
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        ValueHead(0.1, "xavier").init(jax.random.PRNGKey(0), hidden)

    head = ValueHead(0.5)
    p = head.init(jax.random.PRNGKey(0), hidden)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 256))
    eval_a, eval_b = head.apply(p, x), head.apply(p, x)
    train = head.apply(p, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train, eval_a)
    for off in (0.0, None):  # TRL: Identity when 0/None
        h = ValueHead(off)
        np.testing.assert_array_equal(h.apply(p, x, deterministic=False), h.apply(p, x))
    # bf16 hidden states are upcast: float32 values
    assert head.apply(p, x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_value_head_model_save_load_round_trip(lm_dir, tmp_path):
    torch_model, path = lm_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        path, v_head_init_strategy="normal", summary_dropout_prob=0.0, rng=jax.random.PRNGKey(7))
    model.save_pretrained(str(tmp_path))
    sd = load_state_dict(str(tmp_path))
    assert sd["v_head.summary.weight"].shape == (1, model.config.hidden_size)
    assert json.load(open(tmp_path / "config.json"))["summary_dropout_prob"] == 0.0

    restored = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), rng=jax.random.PRNGKey(99))
    jax.tree.map(np.testing.assert_array_equal, model.params, restored.params)
    assert restored.module.summary_dropout_prob == 0.0

    # transformers loads the same directory as a plain causal LM (v_head keys ignored)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, pos = padded_batch("left")
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
        np.testing.assert_allclose(reloaded(**kw).logits.numpy(), torch_model(**kw).logits.numpy(), atol=1e-6)
    # and so does rljax's plain LM loader
    lm, plain = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, plain, lm_params(model.params))

    # a checkpoint without v_head gets a fresh one from rng
    fresh_a = AutoModelForCausalLMWithValueHead.from_pretrained(path, rng=jax.random.PRNGKey(1))
    fresh_b = AutoModelForCausalLMWithValueHead.from_pretrained(path, rng=jax.random.PRNGKey(2))
    assert not np.allclose(fresh_a.params["v_head"]["summary"]["kernel"], fresh_b.params["v_head"]["summary"]["kernel"])


def test_value_head_model_sharded_and_bf16(lm_dir, tmp_path):
    _, path = lm_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path, dtype="bfloat16")
    flat = flatten_dict(model.params)
    assert {v.dtype for p, v in flat.items() if p[0] != "v_head"} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for p, v in flat.items() if p[0] == "v_head"} == {jnp.dtype(jnp.float32)}
    ids, mask, _ = padded_batch("left")
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    assert out.values.dtype == jnp.float32 and bool(jnp.isfinite(out.values).all())

    model.save_pretrained(str(tmp_path), max_shard_size="10KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    restored = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, model.params, restored.params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(hf.parameters()).dtype == torch.bfloat16


def test_value_head_model_caches_like_the_lm(lm_dir):
    _, path = lm_dir
    module, params = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    ids, mask, _ = padded_batch("left", seq=8, lengths=(8, 5, 3))
    apply = jax.jit(lambda x, m, c: module.apply({"params": params}, x, m, cache=c))
    full = apply(jnp.asarray(ids), jnp.asarray(mask), None)
    out = apply(jnp.asarray(ids[:, :6]), jnp.asarray(mask), module.init_cache(3, 8))
    out2 = apply(jnp.asarray(ids[:, 6:]), jnp.asarray(mask), out.cache)
    values = jnp.concatenate([out.values, out2.values], axis=1)
    real = mask.astype(bool)
    assert np.abs(np.asarray(values - full.values))[real].max() < 1e-5


def test_from_lm_wraps_an_rljax_lm(lm_dir):
    _, path = lm_dir
    lm, params = from_pretrained(path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained((lm, params))
    assert set(model.params) == set(params) | {"v_head"}
    ids, mask, _ = padded_batch("left")
    np.testing.assert_allclose(model(jnp.asarray(ids), jnp.asarray(mask)).logits,  # jitted vs eager
                               lm.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits, atol=1e-5)


# --- sequence-score head ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=[("gpt2", 1), ("llama", 2), ("qwen2", 1)])
def score_dir(request, tmp_path_factory):
    name, num_labels = request.param
    cfg = CONFIGS[name](pad_token_id=PAD, num_labels=num_labels)
    torch.manual_seed(0)
    model = perturbed(transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager"))
    path = tmp_path_factory.mktemp(name + "_score")
    model.save_pretrained(path)
    return model, str(path), num_labels


def torch_scores(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_score_matches_transformers(score_dir, side):
    torch_model, path, num_labels = score_dir
    module, params = sequence_score_from_pretrained(path)
    assert isinstance(module, SequenceScoreModel) and module.num_labels == num_labels
    ids, mask, pos = padded_batch(side)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.shape == (3, num_labels)
    np.testing.assert_array_equal(out.last_index, [8, 8, 8] if side == "left" else [8, 4, 1])
    np.testing.assert_allclose(out.logits, torch_scores(torch_model, ids, mask, pos), atol=1e-4)


def test_sequence_score_saves_for_transformers(score_dir, tmp_path):
    torch_model, path, num_labels = score_dir
    module, params = sequence_score_from_pretrained(path)
    save_pretrained(module, params, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == [type(torch_model).__name__]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model) and reloaded.config.num_labels == num_labels
    for side in ("left", "right"):
        ids, mask, pos = padded_batch(side, seed=1)
        ours = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
        np.testing.assert_allclose(ours, torch_scores(reloaded, ids, mask, pos), atol=1e-4)
    _, params2 = sequence_score_from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sequence_score_from_a_causal_lm_checkpoint(lm_dir):
    _, path = lm_dir
    module, params = sequence_score_from_pretrained(path, num_labels=1, rng=jax.random.PRNGKey(3))
    assert "lm_head" not in params and params["score"]["kernel"].shape == (module.config.hidden_size, 1)
    ids, mask, _ = padded_batch("right")
    assert module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits.shape == (3, 1)


def test_sequence_score_num_labels_mismatch_is_a_clear_error(score_dir):
    _, path, num_labels = score_dir
    with pytest.raises(ValueError, match=r"score\.weight has shape"):
        sequence_score_from_pretrained(path, num_labels=num_labels + 1)


def test_last_token_index_handles_both_paddings():
    mask = jnp.array([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [3, 1, 3, 1])


# --- HF/TRL-style shells (rljax.models.auto) -----------------------------------------------

from rljax.models import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402
from rljax.models.hub import from_pretrained as hub_from_pretrained  # noqa: E402


def test_causal_lm_shell_logits_and_loss_match_transformers(lm_dir):
    torch_model, path = lm_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 7))
    labels = ids.copy()
    labels[0, :3] = -100
    out = model(ids, attention_mask=np.ones_like(ids), labels=labels)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-5)
    assert out[0] is out.loss and model(ids)[0] is not None and model(ids).loss is None  # HF ModelOutput indexing
    # the value-head model: TRL's (lm_logits, loss, value) tuple, loss from labels
    vh = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    lm_logits, loss, value = vh(torch.tensor(ids), attention_mask=torch.ones(2, 7, dtype=torch.long), labels=labels)
    np.testing.assert_allclose(lm_logits, out.logits, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
    assert value.shape == (2, 7)
    out_vh = vh(ids)
    assert out_vh.loss is None and out_vh.values.shape == (2, 7) and out_vh.hidden_states.shape[:2] == (2, 7)
    # TRL/torch state dict names: the base model's (tied lm_head listed too) plus v_head.summary.*
    assert set(vh.state_dict()) == set(torch_model.state_dict()) | {"v_head.summary.weight", "v_head.summary.bias"}
    with pytest.raises(ValueError, match="past_key_values"):
        vh(ids, past_key_values=((1, 2),))


def test_generate_greedy_matches_transformers_generate(lm_dir):
    torch_model, path = lm_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    ids, mask, _ = padded_batch("left")
    tids, tmask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():  # HF defaults: greedy, 20 new tokens, eos from the config, stop when all rows end
        ref = torch_model.generate(tids, attention_mask=tmask, pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(model.generate(tids, attention_mask=tmask, pad_token_id=PAD), ref)

    # eos and min_length (which counts the prompt, as in HF): no eos before 3 new tokens
    first = int(ref[0, 9])
    kw = dict(max_new_tokens=4, eos_token_id=first, pad_token_id=PAD, min_length=9 + 3)
    with torch.no_grad():
        ref_min = torch_model.generate(torch.tensor(ids[:1]), **kw).numpy()
    ours_min = model.generate(ids[:1], **kw)
    np.testing.assert_array_equal(ours_min, ref_min)
    assert int(ours_min[0, 9]) != first


@pytest.mark.parametrize("lm_dir", ["gpt2"], indirect=True)  # kwarg handling is family-independent
def test_generate_sampling_rng_and_kwarg_checks(lm_dir):
    _, path = lm_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 5))
    # TRL's PPO example settings (top_k=0.0, min_length=-1); sampled with the model's key stream or rng
    kw = dict(max_new_tokens=8, do_sample=True, top_k=0.0, top_p=1.0, min_length=-1, eos_token_id=None)
    a = model.generate(ids, rng=jax.random.PRNGKey(3), **kw)
    np.testing.assert_array_equal(a, model.generate(ids, rng=jax.random.PRNGKey(3), num_beams=1, use_cache=True, **kw))
    assert a.shape == (2, 13)
    assert not np.array_equal(model.generate(ids, **kw), model.generate(ids, **kw))  # fresh keys per call
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=None)  # do_sample defaults to False
    np.testing.assert_array_equal(model.generate(ids, **{**kw, "top_k": 1}), greedy)
    np.testing.assert_array_equal(model.generate(ids, max_length=13, eos_token_id=None), greedy)  # counts the prompt
    hf_config = transformers.GenerationConfig(max_new_tokens=8)  # a GenerationConfig object, as HF takes
    np.testing.assert_array_equal(model.generate(ids, generation_config=hf_config, eos_token_id=None), greedy)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(ids, generation_config=transformers.GenerationConfig(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match="unknown argument 'foo'"):
        model.generate(ids, foo=1)
    with pytest.raises(ValueError, match="do_sample=True"):
        model.generate(ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_length=5)  # the prompt already fills max_length


def test_trained_params_are_assignable_and_saved(lm_dir, tmp_path):
    _, path = lm_dir
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    trained = jax.tree.map(lambda x: x + 1.0, model.params)
    model.params = trained  # what trainers do after training
    model.save_pretrained(str(tmp_path / "vh"))
    jax.tree.map(np.testing.assert_array_equal,
                 AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "vh")).params, trained)
    # pretrained_model shares the params both ways
    lm = model.pretrained_model
    jax.tree.map(np.testing.assert_array_equal, lm.params, lm_params(trained))
    lm.params = jax.tree.map(lambda x: x * 2.0, lm_params(trained))  # writes the LM part, keeps v_head
    np.testing.assert_array_equal(model.params["v_head"]["summary"]["bias"], trained["v_head"]["summary"]["bias"])
    jax.tree.map(np.testing.assert_array_equal, lm_params(model.params), jax.tree.map(lambda x: x * 2.0, lm_params(trained)))
    lm.save_pretrained(str(tmp_path / "lm"))
    jax.tree.map(np.testing.assert_array_equal, AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).params,
                 lm_params(model.params))
    assert os.path.exists(tmp_path / "lm" / "generation_config.json")


def test_config_view_is_mutable_like_hf(lm_dir, tmp_path):
    _, path = lm_dir
    lm = AutoModelForCausalLM.from_pretrained(path)
    lm.config.summary_dropout_prob = 0.5
    lm.config.pad_token_id = PAD  # a field: the module is rebuilt with it
    assert lm.module.config.pad_token_id == PAD and lm.config.hidden_size == lm.module.config.hidden_size
    before = lm.module
    with pytest.raises(ValueError, match="changes the model's parameters"):
        lm.config.vocab_size = VOCAB + 1
    assert lm.module is before and lm.config.vocab_size == VOCAB
    # TRL reads summary_dropout_prob from the config; an explicit kwarg wins (deliberate difference)
    assert AutoModelForCausalLMWithValueHead.from_pretrained(lm).v_head.dropout.p == 0.5
    assert AutoModelForCausalLMWithValueHead.from_pretrained(lm, summary_dropout_prob=0.2).v_head.dropout.p == 0.2
    lm.config.my_extra = "kept"
    lm.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["my_extra"] == "kept" and saved["pad_token_id"] == PAD and saved["summary_dropout_prob"] == 0.5


def test_from_pretrained_accepts_hf_loader_arguments(lm_dir):
    _, path = lm_dir
    for torch_dtype in (torch.bfloat16, "bfloat16"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(path, torch_dtype=torch_dtype)
        assert model.pretrained_model.lm_head.weight.dtype == jnp.bfloat16
        assert model.v_head.summary.weight.dtype == jnp.float32
    assert AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float16).dtype == jnp.float16
    auto = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", revision="main", low_cpu_mem_usage=True,
                                                device_map=None)  # a local directory ignores revision
    assert {x.dtype for x in jax.tree.leaves(auto.params)} == {jnp.dtype(jnp.float32)}
    _, params = hub_from_pretrained(path, torch_dtype="bfloat16", revision="v1")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLMWithValueHead.from_pretrained(path, trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        sequence_score_from_pretrained(path, trust_remote_code=True)
    with pytest.raises(ValueError, match="pass only one"):
        AutoModelForCausalLM.from_pretrained(path, dtype="float32", torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device_map='auto'"):
        AutoModelForCausalLM.from_pretrained(path, device_map="auto")
    with pytest.raises(ValueError, match="Unknown dtype"):
        AutoModelForCausalLM.from_pretrained(path, torch_dtype="float8")


def test_value_head_from_pretrained_rejects_what_is_not_a_causal_lm(lm_dir, tmp_path):
    _, path = lm_dir
    lm = AutoModelForCausalLM.from_pretrained(path)
    scorer = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    trunk = lm.transformer if "transformer" in lm.params else lm.model
    for bad in (trunk, scorer, (scorer.module, scorer.params), 42):
        with pytest.raises(ValueError, match="does not have a language model head"):
            AutoModelForCausalLMWithValueHead.from_pretrained(bad)


def test_sequence_classification_shell(score_dir, tmp_path):
    torch_model, path, num_labels = score_dir
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.num_labels == num_labels
    module, params = model
    ids, mask, pos = padded_batch("right")
    np.testing.assert_allclose(model(ids, attention_mask=mask).logits, torch_scores(torch_model, ids, mask, pos),
                               atol=1e-4)
    model.params = jax.tree.map(lambda x: x * 1.5, params)
    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, model.params)
    with pytest.raises(ValueError, match="no language-model head"):
        model.generate(ids)
