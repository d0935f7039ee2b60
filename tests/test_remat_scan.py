"""Per-block remat and scanned layers (rljax.models.attention.run_layers): same numbers as the
plain layer loop, less temporary memory under remat, a program that does not grow with depth
under scan, HF names one-to-one on disk, sharding rules that skip the layer axis."""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rljax.models.attention import (
    stack_layer_params,
    supports_layer_options,
    unstack_layer_params,
    with_layer_options,
)
from rljax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from rljax.models.hub import from_pretrained, init_params, save_pretrained
from rljax.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def _gpt2(layers: int = 2, width: int = 16) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=width, n_layer=layers, n_head=2))


def _llama(layers: int = 2) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
    """(plain module, its params, the scanned module, stacked params, left-padded ids, mask)."""
    model = _gpt2(3) if request.param == "gpt2" else _llama(3)
    params = init_params(model, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, VOCAB)
    mask = jnp.ones((2, 7), jnp.int32).at[0, :3].set(0)
    return model, params, with_layer_options(model, scan_layers=True), stack_layer_params(params), ids, mask


def _loss_and_grads(module, params, ids, mask):
    def loss(p):
        logits = module.apply({"params": p}, ids, attention_mask=mask).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_scanned_layers_give_the_same_logits_grads_and_stacked_params(family):
    model, params, scanned, stacked, ids, mask = family
    layer_leaf = jax.tree_util.tree_leaves(stacked)
    assert any(x.shape[0] == 3 and x.ndim >= 2 for x in layer_leaf)
    # init of the scanned module gives the stacked layout itself
    assert jax.tree_util.tree_structure(init_params(scanned, jax.random.PRNGKey(0))) == \
        jax.tree_util.tree_structure(stacked)
    ref = model.apply({"params": params}, ids, attention_mask=mask).logits
    out = scanned.apply({"params": stacked}, ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    loss0, g0 = _loss_and_grads(model, params, ids, mask)
    loss1, g1 = _loss_and_grads(scanned, stacked, ids, mask)
    np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-6)
    _assert_trees_close(unstack_layer_params(g1), g0, atol=1e-6)
    _assert_trees_close(unstack_layer_params(stacked), params, atol=0)


def test_remat_per_block_gives_the_same_loss_and_grads(family):
    model, params, scanned, stacked, ids, mask = family
    for plain, p, policy in ((model, params, "full"), (scanned, stacked, "dots")):
        remat = with_layer_options(plain, remat_policy=policy)
        loss0, g0 = _loss_and_grads(plain, p, ids, mask)
        loss1, g1 = _loss_and_grads(remat, p, ids, mask)
        np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-6)
        _assert_trees_close(g1, g0, atol=1e-6)


def test_remat_keeps_dropout_masks(family):
    """Training mode: the recomputed forward draws the same dropout masks (same grads)."""
    model, params, *_ = family
    if not isinstance(model, GPT2LMHeadModel):
        pytest.skip("GPT-2 is the family with dropout on by default")
    ids = jnp.arange(14).reshape(2, 7) % VOCAB

    def grads(module):
        def loss(p):
            out = module.apply({"params": p}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
            return jnp.mean(jax.nn.log_softmax(out.logits)[..., 1])

        return jax.jit(jax.grad(loss))(params)

    _assert_trees_close(grads(with_layer_options(model, remat_policy="full")), grads(model), atol=1e-6)


def test_scanned_kv_cache_and_greedy_generation_match(family):
    from rljax.generation import generate

    model, params, scanned, stacked, ids, mask = family
    cache = scanned.init_cache(2, 11)
    shape = cache["layers"]["k"].shape  # [layer, batch, kv_heads, slots, head_dim]
    assert (shape[:2], shape[3]) == ((3, 2), 11)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = generate(model, params, ids, mask, jax.random.PRNGKey(0), **kw)
    out = generate(scanned, stacked, ids, mask, jax.random.PRNGKey(0), **kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(ref.sequences))


def test_save_scanned_load_unscanned_same_tensors_and_logits(family, tmp_path):
    from safetensors.numpy import load_file

    model, params, scanned, stacked, ids, mask = family
    save_pretrained(scanned, stacked, str(tmp_path / "scanned"))
    save_pretrained(model, params, str(tmp_path / "plain"))
    a = load_file(str(tmp_path / "scanned" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert sorted(a) == sorted(b)  # per-layer HF names on disk, whatever the layout in memory
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    cfg = json.load(open(tmp_path / "scanned" / "config.json"))
    assert "scan_layers" not in cfg and "remat_policy" not in cfg
    ref = model.apply({"params": params}, ids, attention_mask=mask).logits
    plain_module, plain_params = from_pretrained(str(tmp_path / "scanned"))
    assert not plain_module.config.scan_layers
    np.testing.assert_allclose(np.asarray(plain_module.apply({"params": plain_params}, ids, attention_mask=mask).logits),
                               np.asarray(ref), atol=1e-5)
    scan_module, scan_params = from_pretrained(str(tmp_path / "plain"), scan_layers=True, remat_policy="dots")
    assert scan_module.config.scan_layers and scan_module.config.remat_policy == "dots"
    np.testing.assert_allclose(np.asarray(scan_module.apply({"params": scan_params}, ids, attention_mask=mask).logits),
                               np.asarray(ref), atol=1e-5)


def _grad_step_lowered(module, seq: int = 32, batch: int = 4):
    """The jitted loss+grad of ``module`` lowered on abstract params and ids (nothing materialised)."""
    abstract = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(p, x):
        return jnp.mean(jax.nn.log_softmax(module.apply({"params": p}, x).logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss)).lower(abstract, ids)


def test_remat_lowers_the_temporary_memory_of_the_grad_step():
    """Scanned layers: the backward pass keeps only each block's input (8 layers: ~13 MB of
    temporaries instead of ~99 MB). Unscanned, XLA:CPU's scheduler recomputes the blocks early
    and the saving does not show on CPU (see experiments/benchmarks/RESULTS.md)."""
    model = with_layer_options(_gpt2(layers=6, width=32), scan_layers=True)

    def temp_bytes(policy):
        lowered = _grad_step_lowered(with_layer_options(model, remat_policy=policy), seq=64, batch=8)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes("none"), temp_bytes("full")
    assert remat < 0.5 * plain, (remat, plain)


def test_scanned_program_does_not_grow_with_depth():
    def hlo_len(layers, scan):
        module = with_layer_options(_gpt2(layers), scan_layers=scan)
        return len(_grad_step_lowered(module, seq=8, batch=2).as_text())

    scanned = hlo_len(2, True), hlo_len(8, True)
    plain = hlo_len(2, False), hlo_len(8, False)
    assert scanned[1] < 1.05 * scanned[0], scanned
    assert plain[1] > 2.5 * plain[0], plain


def test_sharding_rules_skip_the_layer_axis():
    from rljax.sharding import infer_family, make_mesh, partition_specs

    model = with_layer_options(_llama(2), scan_layers=True)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    assert infer_family(abstract) == "llama"
    specs = partition_specs(abstract, make_mesh(data=2, fsdp=2, model=2))
    layers = specs["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "model")  # [layer, hidden, heads*dim]
    assert layers["mlp"]["down_proj"]["kernel"] == P(None, "model", "fsdp")
    assert specs["model"]["embed_tokens"]["embedding"] == P("model", "fsdp")


def test_layer_option_errors_name_the_fix():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      model_type="qwen2", use_sliding_window=True, sliding_window=4,
                      layer_types=("full_attention", "sliding_attention"))
    mixed = with_layer_options(LlamaForCausalLM(cfg), scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers=False"):
        init_params(mixed, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="remat_policy"):
        with_layer_options(_gpt2(), remat_policy="some")
    assert not supports_layer_options(object())


def test_trainer_gradient_checkpointing_turns_on_remat_per_block(tmp_path):
    from rljax.trainers.base import Trainer, TrainingArguments

    def shell(**kw):
        args = TrainingArguments(output_dir=str(tmp_path), **kw)
        return types.SimpleNamespace(args=args, module=_gpt2())

    assert Trainer.compute_module.fget(shell()).config.remat_policy == "none"
    assert Trainer.compute_module.fget(shell(gradient_checkpointing=True)).config.remat_policy == "full"
    dots = shell(gradient_checkpointing=True, gradient_checkpointing_kwargs={"policy": "dots"})
    assert Trainer.compute_module.fget(dots).config.remat_policy == "dots"
    assert not Trainer._remat_whole_loss(dots)  # the per-block remat replaces jax.checkpoint of the loss
    with pytest.raises(ValueError, match="policy"):
        TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing_kwargs={"policy": "all"})
