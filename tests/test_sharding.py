"""rljax.sharding: meshes, partition rules, and rljax's pure steps run unchanged on a mesh.

The step tests jit the existing functional steps (SFT ``make_train_step``, PPO
``make_ppo_step``, greedy generation, DPO) with ``in_shardings``/``out_shardings`` on
(8,1,1), (2,4,1) and (2,2,2) meshes of simulated CPU devices and compare with one
device. Tolerance 1e-5 (float32): sharded reductions sum in another order. The test
optimizers use Adam eps=1e-6 instead of 1e-8 because some gradients are exactly zero
in exact arithmetic (e.g. attention key biases: softmax ignores a per-query constant),
so both runs see ~1e-9 rounding noise there, which eps=1e-8 would normalise into
updates of ~lr/10 that differ between layouts.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import _mesh_fixtures as F
from rljax import sharding as S

MESHES = [
    pytest.param((8, 1, 1), marks=pytest.mark.slow, id="dp8"),
    pytest.param((2, 4, 1), marks=pytest.mark.slow, id="dp2-fsdp4"),
    pytest.param((2, 2, 2), id="dp2-fsdp2-tp2"),
]
# PPO's step and generation: pure data parallel (one row per device) and all three axes at once;
# fsdp 4 runs the same partitioning rules as fsdp 2 (the SFT step keeps it: one compile less each).
MESHES_DP_AND_3D = [MESHES[0], MESHES[2]]
ATOL = 1e-5


def _max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0, a, b)
    return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def _leaf(tree, path: str):
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if S.path_str(p) == path:
            return x
    raise KeyError(path)


def _shard_shape(x) -> tuple:
    return tuple(x.addressable_shards[0].data.shape)


# --------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------


def test_make_mesh_fills_the_rest_and_names_axes():
    mesh = S.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert S.mesh_shape(mesh) == (8, 1, 1)
    assert S.mesh_shape(S.make_mesh(data=2, fsdp=-1)) == (2, 4, 1)
    assert S.mesh_shape(S.make_mesh(2, 2, 2)) == (2, 2, 2)
    assert S.mesh_shape(S.make_mesh(devices=jax.devices()[:2])) == (2, 1, 1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(data=3), "must multiply to the device count"),
        (dict(data=-1, fsdp=3), "3 does not divide 8"),
        (dict(data=-1, fsdp=-1), "At most one mesh axis may be -1"),
        (dict(data=0), "must be positive"),
    ],
)
def test_make_mesh_rejects_sizes_that_do_not_fit(kw, match):
    with pytest.raises(ValueError, match=match):
        S.make_mesh(**kw)


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def _abstract_gpt2(**kw):
    from rljax.models import abstract_params
    from rljax.models.gpt2 import GPT2LMHeadModel

    return abstract_params(GPT2LMHeadModel(F.tiny_gpt2_config(**kw)))


def test_gpt2_rules_shard_heads_mlp_and_embeddings():
    params = _abstract_gpt2(n_embd=64, n_head=8, vocab_size=128, tie_word_embeddings=False)
    mesh = S.make_mesh(2, 2, 2)
    assert S.infer_family(params) == "gpt2"
    specs = S.partition_specs(params, mesh)
    expect = {
        "transformer/h_1/attn/c_attn/kernel": P("fsdp", "model"),
        "transformer/h_1/attn/c_attn/bias": P("model"),
        "transformer/h_1/attn/c_proj/kernel": P("model", "fsdp"),
        "transformer/h_1/attn/c_proj/bias": P(),
        "transformer/h_0/mlp/c_fc/kernel": P("fsdp", "model"),
        "transformer/h_0/mlp/c_fc/bias": P("model"),
        "transformer/h_0/mlp/c_proj/kernel": P("model", "fsdp"),
        "transformer/h_0/ln_1/scale": P(),
        "transformer/ln_f/bias": P(),
        "transformer/wte/embedding": P("model", "fsdp"),
        "transformer/wpe/embedding": P(None, "fsdp"),
        "lm_head/kernel": P("fsdp", "model"),
    }
    for path, spec in expect.items():
        assert _leaf(specs, path) == spec, path


def test_llama_rules_shard_projections_and_keep_norms_replicated():
    from rljax.models import abstract_params
    from rljax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, model_type="qwen2")
    params = abstract_params(LlamaForCausalLM(cfg))
    assert S.infer_family(params) == "llama"
    specs = S.partition_specs(params, S.make_mesh(1, 2, 4))
    expect = {
        "model/embed_tokens/embedding": P("model", "fsdp"),
        "model/layers_0/self_attn/q_proj/kernel": P("fsdp", "model"),
        "model/layers_0/self_attn/q_proj/bias": P("model"),  # qwen2: q/k/v biases
        "model/layers_0/self_attn/k_proj/kernel": P("fsdp", "model"),  # 2 kv heads x 8 = 16 features / 4
        "model/layers_1/self_attn/o_proj/kernel": P("model", "fsdp"),
        "model/layers_1/mlp/gate_proj/kernel": P("fsdp", "model"),
        "model/layers_1/mlp/up_proj/kernel": P("fsdp", "model"),
        "model/layers_1/mlp/down_proj/kernel": P("model", "fsdp"),
        "model/layers_1/input_layernorm/weight": P(),
        "model/norm/weight": P(),
        "lm_head/kernel": P("fsdp", "model"),
    }
    for path, spec in expect.items():
        assert _leaf(specs, path) == spec, path


def test_rules_replicate_dims_the_mesh_does_not_divide():
    # vocab 61, width 12, 3 heads: almost nothing divides 2 or 4; sharding must still work.
    params = _abstract_gpt2(vocab_size=61, n_embd=12, n_head=3, n_positions=10)
    mesh = S.make_mesh(1, 2, 4)
    specs = S.partition_specs(params, mesh)
    assert _leaf(specs, "transformer/wte/embedding") == P(None, "fsdp")  # 61 rows: not on model
    assert _leaf(specs, "transformer/h_0/attn/c_attn/kernel") == P("fsdp", "model")  # [12, 36]
    assert _leaf(specs, "transformer/h_0/attn/c_proj/kernel") == P("model", "fsdp")  # [12, 12]
    assert _leaf(specs, "transformer/wpe/embedding") == P(None, "fsdp")
    odd_vocab = _abstract_gpt2(vocab_size=61, n_embd=16, n_head=4)  # like GPT-2's 50257: hidden on fsdp x model
    assert _leaf(S.partition_specs(odd_vocab, mesh), "transformer/wte/embedding") == P(None, ("fsdp", "model"))
    assert S.fit_spec(P("fsdp", "model"), (3, 5), mesh) == P()
    assert S.fit_spec(P(("data", "fsdp")), (6,), S.make_mesh(2, 4, 1)) == P()
    assert S.fit_spec(P("fsdp"), (), mesh) == P()
    # Real placement works too (and really splits what divides).
    from rljax.models import init_params
    from rljax.models.gpt2 import GPT2LMHeadModel

    real = init_params(GPT2LMHeadModel(F.tiny_gpt2_config(vocab_size=61, n_embd=12, n_head=3, n_positions=10)), jax.random.PRNGKey(0))
    sharded = S.shard_params(real, mesh)
    assert _shard_shape(sharded["transformer"]["wte"]["embedding"]) == (61, 6)
    assert _max_diff(sharded, real) == 0.0


def test_rule_with_too_many_dims_is_a_clear_error():
    with pytest.raises(ValueError, match="make the rule's regex more specific"):
        S.fit_spec(P("fsdp", "model"), (8,), S.make_mesh(), "x/bias")


def test_unknown_models_get_fsdp_on_their_largest_dim():
    tree = {"encoder": {"w": jax.ShapeDtypeStruct((4, 16), jnp.float32), "b": jax.ShapeDtypeStruct((16,), jnp.float32)},
            "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    assert S.infer_family(tree) is None
    specs = S.partition_specs(tree, S.make_mesh(2, 4, 1))
    assert specs["encoder"]["w"] == P(None, "fsdp")
    assert specs["encoder"]["b"] == P()
    assert specs["odd"] == P()


def test_state_shardings_mirror_params_in_optimizer_state_and_replicate_scalars():
    module, config, state, _, _ = _ppo_setup()
    mesh = S.make_mesh(2, 2, 2)
    sh = S.state_shardings(state, mesh)
    kernel = "transformer/h_0/attn/c_attn/kernel"
    assert _leaf(sh, f"params/{kernel}").spec == P("fsdp", "model")
    assert _leaf(sh, f"ref_params/{kernel}").spec == P("fsdp", "model")
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0] if S.path_str(p).endswith("mu/" + kernel)]
    nu = [x for p, x in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0] if S.path_str(p).endswith("nu/" + kernel)]
    assert [m.spec for m in mu] == [P("fsdp", "model")] and [n.spec for n in nu] == [P("fsdp", "model")]
    assert _leaf(sh, "params/v_head/summary/kernel").spec == P()  # value head replicated
    for path in ("step", "rng", "kl/value", "score_moments/mean", "score_moments/count"):
        assert _leaf(sh, path).spec == P(), path
    counts = [x.spec for p, x in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0] if S.path_str(p).endswith("count")]
    assert counts and all(c == P() for c in counts)
    assert sh.kl.adaptive == state.kl.adaptive  # static fields kept


def test_shard_batch_splits_the_leading_axis_and_checks_divisibility():
    mesh = S.make_mesh(2, 2, 2)
    batch = F.sft_batch(8)
    out = S.shard_batch(dict(batch, scale=np.float32(2.0)), mesh)
    assert out["input_ids"].sharding.spec == P(("data", "fsdp"))
    assert _shard_shape(out["input_ids"]) == (2, 16)
    assert out["scale"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(out["labels"]), batch["labels"])
    with pytest.raises(ValueError, match="not a multiple of data x fsdp = 4"):
        S.shard_batch({"x": np.zeros((6, 3))}, mesh)
    glob = S.make_global_batch(batch, mesh)  # one process: the local batch is the global batch
    np.testing.assert_array_equal(np.asarray(glob["input_ids"]), batch["input_ids"])


def test_per_device_bytes_counts_only_the_local_shard():
    params = _abstract_gpt2(n_embd=64, n_head=8, vocab_size=128)
    full = S.per_device_bytes(params)
    sh = S.param_shardings(params, S.make_mesh(1, 8, 1))
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, sh)
    assert S.per_device_bytes(abstract) < full / 4


# --------------------------------------------------------------------------
# Steps on a mesh == steps on one device
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sft_setup():
    module, params = F.tiny_gpt2(n_layer=1)
    state = F.sft_state(module, params, adam_eps=1e-6)
    return module, state, F.sft_batch(8)


@functools.lru_cache(maxsize=None)
def _sft_reference():
    from rljax.sft import make_sft_loss
    from rljax.trainers.base import make_train_step

    module, state, batch = _sft_setup()
    step = make_train_step(make_sft_loss(module), gradient_accumulation_steps=2, donate=False)
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, F.sft_batch(8, seed=1))
    return F.to_numpy((s2, m1, m2))


@pytest.mark.parametrize("shape", MESHES)
def test_sft_step_on_mesh_matches_one_device(shape):
    from rljax.sft import make_sft_loss
    from rljax.trainers.base import make_train_step

    module, state, batch = _sft_setup()
    ref_state, ref_m1, ref_m2 = _sft_reference()
    mesh = S.make_mesh(*shape)
    state = S.shard_params(state, mesh, copy=True)  # the step donates; keep the cached state alive
    sh = S.state_shardings(state, mesh)
    step = S.jit_sharded(
        make_train_step(make_sft_loss(module), gradient_accumulation_steps=2), mesh,
        in_shardings=(sh, S.batch_sharding(mesh)), out_shardings=(sh, S.replicated(mesh)), donate_argnums=(0,),
    )
    state, m1 = step(state, S.shard_batch(batch, mesh))
    state, m2 = step(state, S.shard_batch(F.sft_batch(8, seed=1), mesh))
    assert _max_diff(state.params, ref_state.params) < ATOL
    assert _max_diff(state.opt_state, ref_state.opt_state) < ATOL
    assert _max_diff((m1, m2), (ref_m1, ref_m2)) < ATOL
    assert int(state.step) == 2
    # really sharded: params and Adam moments carry the rule's spec and the local shard shape
    kernel = state.params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"]  # [32, 96]
    d, f, m = shape
    assert kernel.sharding.spec == P("fsdp", "model")
    assert _shard_shape(kernel) == (32 // f, 96 // m)
    mu = state.opt_state[1][0].mu["transformer"]["h_0"]["attn"]["c_attn"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "model") and _shard_shape(mu) == (32 // f, 96 // m)
    assert _shard_shape(state.params["transformer"]["wte"]["embedding"]) == (F.VOCAB // m, 32 // f)


@functools.lru_cache(maxsize=None)
def _ppo_tx():
    """The optimizer of the state and of the step (the step closes over it)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, eps=1e-6))


@functools.lru_cache(maxsize=None)
def _ppo_setup():
    return F.ppo_setup(tx=_ppo_tx())


@functools.lru_cache(maxsize=None)
def _ppo_reference():
    from rljax.ppo_train import make_ppo_step

    module, config, state, rollout, scores = _ppo_setup()
    return F.to_numpy(jax.jit(make_ppo_step(module, config, tx=_ppo_tx()))(state, rollout, scores))


@pytest.mark.parametrize("shape", MESHES_DP_AND_3D)
def test_ppo_step_on_mesh_matches_one_device(shape):
    from rljax.ppo_train import make_ppo_step

    module, config, state, rollout, scores = _ppo_setup()
    ref_state, ref_stats = _ppo_reference()
    mesh = S.make_mesh(*shape)
    state = S.shard_params(state, mesh, copy=True)
    sh = S.state_shardings(state, mesh)
    step = S.jit_sharded(
        make_ppo_step(module, config, tx=_ppo_tx()), mesh,
        in_shardings=(sh, S.batch_sharding(mesh), S.batch_sharding(mesh)),
        out_shardings=(sh, S.replicated(mesh)), donate_argnums=(0,),
    )
    new, stats = step(state, S.shard_batch(rollout, mesh), S.shard_batch(scores, mesh))
    assert _max_diff(new.params, ref_state.params) < ATOL
    assert _max_diff(new.opt_state, ref_state.opt_state) < ATOL
    assert _max_diff((new.kl, new.score_moments), (ref_state.kl, ref_state.score_moments)) < ATOL
    assert set(stats) == set(ref_stats)
    assert _max_diff(stats, ref_stats) < 1e-4  # stats include sums over tokens (e.g. objective/kl)
    assert float(ref_stats["ppo/epochs_run"]) == 2.0
    d, f, m = shape
    kernel = new.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]  # [32, 128]
    assert kernel.sharding.spec == P("fsdp", "model") and _shard_shape(kernel) == (32 // f, 128 // m)
    assert new.params["v_head"]["summary"]["kernel"].sharding.spec == P()
    ref_kernel = new.ref_params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert _shard_shape(ref_kernel) == (32 // f, 128 // m)


def _generation():
    return pytest.importorskip("rljax.generation", reason="rljax.generation has not landed")


@functools.lru_cache(maxsize=None)
def _gen_setup():
    gen = _generation()
    module, params = F.tiny_gpt2(n_layer=1)
    q, qm, _, _ = F.ppo_inputs(8, query_len=6)
    fn = gen.make_generate_fn(module, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0,
                              return_logprobs=True, jit=False)
    ref = F.to_numpy(jax.jit(fn)(params, q, qm, jax.random.PRNGKey(0)))
    return module, params, q, qm, fn, ref


@pytest.mark.parametrize("shape", MESHES_DP_AND_3D)
def test_greedy_generation_on_mesh_matches_one_device(shape):
    module, params, q, qm, fn, ref = _gen_setup()
    mesh = S.make_mesh(*shape)
    sp = S.shard_params(params, mesh)
    psh = S.param_shardings(sp, mesh)
    bsh = S.batch_sharding(mesh)
    gen = S.jit_sharded(fn, mesh, in_shardings=(psh, bsh, bsh, S.replicated(mesh)), out_shardings=bsh)
    out = gen(sp, *S.shard_batch((q, qm), mesh), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.sequences), ref.sequences)
    np.testing.assert_array_equal(np.asarray(out.response_mask), ref.response_mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref.logprobs, atol=ATOL)
    assert out.sequences.sharding.spec == P(("data", "fsdp"))


@pytest.mark.slow
def test_dpo_step_on_mesh_matches_one_device():
    dpo = pytest.importorskip("rljax.dpo", reason="rljax.dpo has not landed")
    if not hasattr(dpo, "make_dpo_loss"):
        pytest.skip("rljax.dpo exposes no make_dpo_loss yet")
    from rljax.trainers.base import make_train_step

    module, state, _ = _sft_setup()
    rng = np.random.default_rng(3)
    B, L = 8, 12
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, F.VOCAB, size=(B, L)).astype(np.int32)
        mask = (np.arange(L)[None] < rng.integers(6, L + 1, size=(B, 1))).astype(np.int32)
        labels = np.where((mask > 0) & (np.arange(L)[None] >= 4), ids, -100).astype(np.int32)
        batch.update({f"{side}_input_ids": ids * mask, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    batch["reference_chosen_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    batch["reference_rejected_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    loss = dpo.make_dpo_loss(module, beta=0.1)
    ref_state, ref_m = F.to_numpy(make_train_step(loss, donate=False)(state, batch))
    mesh = S.make_mesh(2, 2, 2)
    sstate = S.shard_params(state, mesh, copy=True)
    sh = S.state_shardings(sstate, mesh)
    step = S.jit_sharded(make_train_step(loss), mesh, (sh, S.batch_sharding(mesh)), (sh, S.replicated(mesh)), donate_argnums=(0,))
    new, m = step(sstate, S.shard_batch(batch, mesh))
    assert _max_diff(new.params, ref_state.params) < ATOL
    assert _max_diff(m, ref_m) < 1e-4


# --------------------------------------------------------------------------
# Trainer shells take a mesh
# --------------------------------------------------------------------------


def test_sft_trainer_on_a_mesh_matches_one_device_and_shards_its_state(tiny_tokenizer, tmp_path):
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module = model_from_config(cfg)
    params = init_params(module, jax.random.PRNGKey(0))
    data = [{"text": t} for t in ["the movie was great", "the film was bad", "a happy day", "a sad night"] * 4]

    def run(mesh, out):
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=8, max_steps=3, logging_steps=1,
                         dataset_text_field="text", max_seq_length=16, disable_tqdm=True, learning_rate=1e-3,
                         adam_epsilon=1e-6, save_strategy="no")
        trainer = SFTTrainer((module, params), args, train_dataset=data, tokenizer=tiny_tokenizer, mesh=mesh)
        trainer.train()
        return trainer

    base = run(None, tmp_path / "one")
    sharded = run(S.make_mesh(data=2, fsdp=4, model=1), tmp_path / "mesh")
    losses = lambda t: [r["loss"] for r in t.log_history if "loss" in r]  # noqa: E731
    np.testing.assert_allclose(losses(sharded), losses(base), rtol=1e-5)
    kernel = sharded.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.shape != kernel.shape  # really split across devices
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(base.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]), atol=1e-5)


def test_ppo_trainer_on_a_mesh_matches_one_device(tiny_tokenizer):
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lm = model_from_config(cfg)
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, init_params(lm, jax.random.PRNGKey(0)), summary_dropout_prob=0.0)
    rng = np.random.RandomState(0)
    queries = [rng.randint(3, 100, n) for n in (3, 5, 2, 4, 6, 3, 2, 5)]
    responses = [rng.randint(3, 100, n) for n in (4, 2, 6, 3, 5, 2, 4, 3)]
    scores = rng.randn(8).astype(np.float32)

    def run(mesh):
        config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3)
        policy = AutoModelForCausalLMWithValueHead(model.module, model.params)  # a trainer publishes trained params on it
        trainer = PPOTrainer(config, policy, tokenizer=tiny_tokenizer, optimizer=optax.adam(1e-3, eps=1e-6), mesh=mesh)
        return trainer, trainer.step(queries, responses, scores)

    base, base_stats = run(None)
    sharded, stats = run(S.make_mesh(2, 2, 2))
    for key in ("objective/kl", "ppo/loss/total", "ppo/policy/approxkl", "ppo/val/error", "ppo/returns/mean"):
        np.testing.assert_allclose(stats[key], base_stats[key], rtol=1e-4, atol=1e-6, err_msg=key)
    kernel = sharded.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.addressable_shards[0].data.shape != kernel.shape
    # 4 Adam updates (lr 1e-3) amplify reduction-order rounding: params agree to 5e-5
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(base.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]), atol=5e-5)
