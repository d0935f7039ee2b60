"""Data parallelism that really happens: the per-device work of rljax's compiled programs.

tests/test_sharding.py checks that a mesh gives one device's numbers; equal numbers cannot
show whether the mesh splits the work (a program that replicates every row on every device
gives them too). Here the programs are only compiled (``jit(...).lower(...).compile()``, no
run) on 8 simulated CPU devices and XLA's cost analysis reads the FLOPs one device runs:

* on a ``data=4`` mesh each device must do about a quarter of the single-device program's
  FLOPs (bound 0.35: the optimizer update of replicated params is not split by data
  parallelism, and tiny models make it a visible share); on ``(2, 2, 2)`` (batch on
  data x fsdp = 4, heads and MLP on model = 2) about an eighth (bound 0.2);
* under ``fsdp=8`` each device holds about an eighth of the parameter bytes.

Programs: the PPO step (TRL's shuffled minibatches with gradient accumulation), the rollout
forward (policy + reference), the DPO train step (gradient accumulation 2), the DPO
reference forward and greedy generation. XLA counts a loop body once, whatever its trip
count, so a ratio compares equal loop structures. Tiny 1-layer GPT-2s, batches large enough
that per-token work dominates the per-parameter work.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _mesh_fixtures as F
from rljax import sharding as S

DATA4 = (4, 1, 1)
MESH222 = (2, 2, 2)
# FLOPs per device / FLOPs of one device: data=4 ideally 0.25, (2, 2, 2) ideally 0.125.
BOUND = {DATA4: 0.35, MESH222: 0.2}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


_DOT = re.compile(r"=\s*\w+\[([\d,]*)\][^=]*?\s(?:dot|convolution)\(")


def _work(compiled) -> float:
    """Per-device FLOPs of a compiled program; where the backend reports none, the summed
    output elements of its matmuls (per-device activation shapes, a proxy with the same ratio)."""
    flops = _cost(compiled).get("flops")
    if flops:
        return float(flops)
    return float(sum(math.prod(int(d) for d in m.group(1).split(",") if d) for m in _DOT.finditer(compiled.as_text())))


def _mesh(shape):
    return S.make_mesh(*shape, devices=jax.devices()[: math.prod(shape)])


def _compile(fn, args, shardings, shape):
    """``fn`` compiled on one device (``shape`` None) or on a mesh of ``shape`` with
    ``in_shardings = shardings(mesh)`` through ``jit_sharded`` (its mesh is ambient while tracing)."""
    if shape is None:
        return jax.jit(fn).lower(*args).compile()
    mesh = _mesh(shape)
    return S.jit_sharded(fn, mesh, in_shardings=shardings(mesh)).lower(*args).compile()


def _ratio(name, fn, args, shardings, shape) -> float:
    return _work(_compile(fn, args, shardings, shape)) / _single(name, fn, args, shardings)


_SINGLE = {}


def _single(name, fn, args, shardings) -> float:
    if name not in _SINGLE:
        _SINGLE[name] = _work(_compile(fn, args, shardings, None))
    return _SINGLE[name]


# --------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ppo():
    from rljax.ppo_train import PPOTrainState, make_forward_rollout, make_ppo_step

    config = F.ppo_config(batch_size=32, mini_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=2)
    module, params = F.tiny_value_model()
    q, qm, r, rm = F.ppo_inputs(config.batch_size, query_len=12, response_len=12)
    state = PPOTrainState.create(params, params, config)
    forward = make_forward_rollout(module)
    rollout = jax.eval_shape(forward, params, params, q, qm, r, rm)
    scores = jax.ShapeDtypeStruct((config.batch_size,), np.float32)
    return make_ppo_step(module, config), forward, state, rollout, scores, (params, params, q, qm, r, rm)


def _ppo_step_shardings(mesh):
    _, _, state, *_ = _ppo()
    rows = S.batch_sharding(mesh)
    return (S.state_shardings(state, mesh), rows, rows)


@pytest.mark.parametrize("shape", [DATA4, MESH222], ids=["data4", "dp2-fsdp2-tp2"])
def test_ppo_step_splits_its_work_over_the_batch_axes(shape):
    step, _, state, rollout, scores, _ = _ppo()
    ratio = _ratio("ppo_step", step, (state, rollout, scores), _ppo_step_shardings, shape)
    assert ratio <= BOUND[shape], f"each device does {ratio:.3f} of one device's PPO step FLOPs on {shape}"


def test_rollout_forward_splits_its_work_over_the_batch_axes():
    _, forward, state, _, _, args = _ppo()

    def shardings(mesh):
        sh = S.state_shardings(state, mesh)
        return (sh.params, sh.ref_params) + (S.batch_sharding(mesh),) * 4

    ratio = _ratio("rollout_forward", forward, args, shardings, DATA4)
    assert ratio <= 0.3, f"each device does {ratio:.3f} of one device's rollout-forward FLOPs"


def test_fsdp8_puts_an_eighth_of_the_parameter_bytes_on_each_device():
    """Policy and reference params (the rollout forward's arguments) under fsdp=8."""
    _, forward, state, _, _, args = _ppo()

    def shardings(mesh):
        sh = S.state_shardings(state, mesh)
        return (sh.params, sh.ref_params) + (S.batch_sharding(mesh),) * 4

    params_only = lambda p, r: (p, r)  # noqa: E731
    one = _compile(params_only, args[:2], lambda m: shardings(m)[:2], None)
    eight = _compile(params_only, args[:2], lambda m: shardings(m)[:2], (1, 8, 1))
    mem_one, mem_eight = one.memory_analysis(), eight.memory_analysis()
    if mem_one is not None and getattr(mem_one, "argument_size_in_bytes", 0):
        ratio = mem_eight.argument_size_in_bytes / mem_one.argument_size_in_bytes
    else:  # the shardings' shard shapes
        placed = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args[:2], eight.input_shardings[0]
        )
        ratio = S.per_device_bytes(placed, jax.devices()[0]) / S.per_device_bytes(args[:2])
    # 1/8 of every matrix; biases, layer norms and the value head are replicated (a few % here)
    assert ratio <= 0.16, f"each device holds {ratio:.3f} of the parameter bytes under fsdp=8"


# --------------------------------------------------------------------------
# DPO and generation
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dpo():
    from rljax.dpo import make_dpo_loss, make_reference_logps_fn
    from rljax.trainers.base import make_train_step

    module, params = F.tiny_gpt2(n_layer=1)
    state = F.sft_state(module, params)
    rng = np.random.default_rng(3)
    B, L = 32, 24
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, F.VOCAB, size=(B, L)).astype(np.int32)
        mask = (np.arange(L)[None] < rng.integers(12, L + 1, size=(B, 1))).astype(np.int32)
        labels = np.where((mask > 0) & (np.arange(L)[None] >= 8), ids, -100).astype(np.int32)
        batch.update({f"{side}_input_ids": ids * mask, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    batch["reference_chosen_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    batch["reference_rejected_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    step = make_train_step(make_dpo_loss(module), gradient_accumulation_steps=2, donate=False)
    return module, params, state, batch, step, make_reference_logps_fn(module)


@pytest.mark.parametrize("head", ["all_columns", "completion_columns"])
def test_dpo_step_with_gradient_accumulation_splits_its_work(head):
    from rljax.dpo import add_completion_positions

    _, _, state, batch, step, _ = _dpo()
    if head == "completion_columns":  # the LM head on a gather of the completion columns
        batch = add_completion_positions(batch, pad_to_multiple_of=8)
    shardings = lambda m: (S.state_shardings(state, m), S.batch_sharding(m))  # noqa: E731
    ratio = _ratio(f"dpo_step_{head}", step, (state, batch), shardings, DATA4)
    assert ratio <= BOUND[DATA4], f"each device does {ratio:.3f} of one device's DPO step FLOPs"


def test_dpo_reference_forward_on_a_mesh_shards_the_reference_like_the_policy():
    from rljax.dpo import make_reference_logps_fn

    module, params, _, batch, _, single = _dpo()
    mesh = _mesh(DATA4)
    on_mesh = make_reference_logps_fn(module, mesh=mesh)
    ref = S.shard_params(params, mesh, copy=True)
    rc, rr = on_mesh(ref, batch)
    want = single(params, batch)
    np.testing.assert_allclose(np.asarray(rc), np.asarray(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rr), np.asarray(want[1]), rtol=1e-5)
    assert rc.sharding.spec == P(("data", "fsdp"))
    # the compiled program does a quarter of the work: the batch rows are split
    compiled = on_mesh.lower(ref, batch).compile()
    ratio = _work(compiled) / _work(jax.jit(single).lower(params, batch).compile())
    assert ratio <= 0.3, f"each device does {ratio:.3f} of the reference forward's FLOPs"


def test_greedy_generation_splits_rows_and_kv_cache():
    from rljax.generation import make_generate_fn

    module, params, *_ = _dpo()
    q, qm, _, _ = F.ppo_inputs(32, query_len=8)
    fn = make_generate_fn(module, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0, jit=False)

    def shardings(mesh):
        rows = S.batch_sharding(mesh)
        return (S.param_shardings(params, mesh), rows, rows, S.replicated(mesh))

    compiled = _compile(fn, (params, q, qm, jax.random.PRNGKey(0)), shardings, DATA4)
    ratio = _work(compiled) / _single("generate", fn, (params, q, qm, jax.random.PRNGKey(0)), shardings)
    assert ratio <= 0.3, f"each device does {ratio:.3f} of one device's generation FLOPs"
    # the KV cache carried by the decode loop holds 32 / 4 rows per device: [8, 4 heads, 16 slots, 8]
    assert re.search(r"f32\[8,4,16,8\]", compiled.as_text())
    assert not re.search(r"f32\[32,4,16,8\]", compiled.as_text())


# --------------------------------------------------------------------------
# constrain_batch
# --------------------------------------------------------------------------


def test_constrain_batch_is_a_no_op_off_a_mesh_and_picks_the_axes_that_divide():
    x = np.zeros((6, 3), np.float32)
    assert S.constrain_batch(x) is x  # no mesh given, none ambient
    mesh = S.make_mesh(2, 4, 1)
    out = jax.jit(lambda a: S.constrain_batch(a, mesh))(np.zeros((8, 3), np.float32))
    assert out.sharding.spec[0] == ("data", "fsdp")
    out = jax.jit(lambda a: S.constrain_batch(a, mesh))(np.zeros((6, 3), np.float32))  # 6 rows: only data=2 divides
    assert out.sharding.spec[0] == "data"
    out = jax.jit(lambda a: S.constrain_batch(a, mesh, batch_axis=1))(np.zeros((3, 8), np.float32))
    assert out.sharding.spec[1] == ("data", "fsdp")
    step = S.jit_sharded(lambda a: S.constrain_batch(a) * 2, mesh, in_shardings=S.replicated(mesh))
    assert step(np.ones((8, 2), np.float32)).sharding.spec[0] == ("data", "fsdp")  # the ambient mesh


def test_dpo_trainer_on_a_mesh_shards_the_reference_and_splits_its_forward(tiny_tokenizer, tmp_path):
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.trainers.dpo import DPOConfig, DPOTrainer

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module = model_from_config(cfg)
    params = init_params(module, jax.random.PRNGKey(0))
    rows = [{"prompt": f"the movie {w}", "chosen": " was great", "rejected": " was bad"} for w in ("a", "b", "c", "d")]

    def trainer(mesh, out):
        args = DPOConfig(output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=1, max_length=32,
                         max_prompt_length=16, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
        return DPOTrainer((module, params), args=args, train_dataset=rows, tokenizer=tiny_tokenizer, mesh=mesh)

    base, sharded = trainer(None, "one"), trainer(S.make_mesh(1, 4, 1, devices=jax.devices()[:4]), "mesh")
    kernel = sharded.ref_params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]  # [32, 128]
    assert kernel.sharding.spec == P("fsdp", "model") and kernel.addressable_shards[0].data.shape == (8, 128)
    want, got = base.collate(base.train_dataset), sharded.collate(sharded.train_dataset)
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, err_msg=key)
        assert got[key].sharding.spec == P(("data", "fsdp")), key  # each device scored its own rows


# --------------------------------------------------------------------------
# Compute only what is used: the LM head on the response window, chunked rollout forwards
# --------------------------------------------------------------------------

# A vocabulary much wider than the model, as in real LMs (GPT-2: 50257 x 768), so the head's
# share of the work is visible in a 1-layer model.
WIDE_VOCAB = 2048


@functools.lru_cache(maxsize=None)
def _wide_value_model():
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    lm, lm_params = F.tiny_gpt2(n_layer=1, vocab_size=WIDE_VOCAB)
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, lm_params, rng=jax.random.PRNGKey(1))
    return model.module, model.params


def _full_head_forward(module):
    """The rollout forward as before the window: both heads on all P+N columns, then sliced."""
    from rljax.core import logprobs_from_logits
    from rljax.rollout import sequence_inputs

    def forward(params, ref_params, q, qm, r, rm):
        ids, am, pos, _ = sequence_inputs(q, qm, r, rm)
        P = q.shape[1]
        out = module.apply({"params": params}, ids, am, pos, deterministic=True)
        ref = module.apply({"params": ref_params}, ids, am, pos, deterministic=True)
        win = lambda x: x[:, P - 1 : -1]  # noqa: E731
        return logprobs_from_logits(win(out.logits), r), logprobs_from_logits(win(ref.logits), r), win(out.values)

    return forward


def test_rollout_and_loss_run_the_lm_head_on_the_response_window_only():
    """Per-device FLOPs of the windowed rollout forward and of the windowed PPO loss gradient vs
    the same programs with the heads on every column (P = N = 16: the window is half the
    columns). The numbers are equal (tests/test_rollout.py); the work is measurably less."""
    from rljax.core import logprobs_from_logits
    from rljax.models.attention import apply_windowed
    from rljax.rollout import make_forward_rollout, response_window, sequence_inputs

    module, params = _wide_value_model()
    q, qm, r, rm = F.ppo_inputs(16, query_len=16, response_len=16)
    args = (params, params, q, qm, r, rm)
    windowed = _work(jax.jit(make_forward_rollout(module)).lower(*args).compile())
    full = _work(jax.jit(_full_head_forward(module)).lower(*args).compile())
    assert windowed <= 0.75 * full, f"windowed rollout forward: {windowed / full:.3f} of the full-head FLOPs"

    def loss(window):
        def fn(p):
            ids, am, pos, _ = sequence_inputs(q, qm, r, rm)
            if window:
                out = apply_windowed(module, {"params": p}, ids, am, pos, logits_window=response_window(16, 16))
                logits, values = out.logits, out.values
            else:
                out = module.apply({"params": p}, ids, am, pos)
                logits, values = out.logits[:, 15:-1], out.values[:, 15:-1]
            return jnp.sum(logprobs_from_logits(logits, r) * rm) + jnp.sum(values * rm)

        return jax.jit(jax.grad(fn)).lower(params).compile()

    ratio = _work(loss(True)) / _work(loss(False))
    assert ratio <= 0.75, f"windowed loss gradient: {ratio:.3f} of the full-head FLOPs"


def _temp_bytes(compiled) -> Optional[int]:
    mem = compiled.memory_analysis()
    return None if mem is None else int(getattr(mem, "temp_size_in_bytes", 0)) or None


def test_chunked_rollout_forward_memory_stays_flat_as_the_batch_grows():
    """``make_forward_rollout(chunk_size=mini_batch_size)``: the compiled program's temporary
    bytes stay ~flat when batch_size grows 4x (8 -> 32 rows at 4 rows per chunk); without
    chunks they grow with the batch."""
    from rljax.rollout import make_forward_rollout

    module, params = _wide_value_model()

    def temp(batch_size, chunk_size):
        args = (params, params) + tuple(F.ppo_inputs(batch_size, query_len=16, response_len=16))
        return _temp_bytes(jax.jit(make_forward_rollout(module, chunk_size=chunk_size)).lower(*args).compile())

    small, large = temp(8, 4), temp(32, 4)
    if small is None:
        pytest.skip("this backend reports no memory analysis")
    assert large <= 1.5 * small, f"chunked: temp bytes {small} -> {large} for 4x the rows"
    unchunked_small, unchunked_large = temp(8, None), temp(32, None)
    assert unchunked_large >= 2.5 * unchunked_small, (unchunked_small, unchunked_large)


def _dpo_pairs(B: int, L: int, prompt: tuple, seed: int = 5) -> dict:
    """A decoder-only DPO batch: right-padded rows, prompt lengths in ``prompt`` (masked labels)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, WIDE_VOCAB, size=(B, L)).astype(np.int32)
        mask = (np.arange(L)[None] < rng.integers(L - 4, L + 1, size=(B, 1))).astype(np.int32)
        labels = np.where((mask > 0) & (np.arange(L)[None] >= rng.integers(*prompt, size=(B, 1))), ids, -100)
        batch.update({f"{side}_input_ids": ids * mask, f"{side}_attention_mask": mask,
                      f"{side}_labels": labels.astype(np.int32)})
    batch["reference_chosen_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    batch["reference_rejected_logps"] = rng.normal(-30, 1, size=(B,)).astype(np.float32)
    return batch


def test_dpo_runs_the_lm_head_on_the_completion_tokens_only():
    """The DPO loss gradient and the reference forward with ``*_completion_positions`` (the head
    and log-softmax on the W = 16 completion columns) vs without (the head on all L = 32; prompts
    of 16-19 tokens are masked): equal numbers, and the compiled programs' FLOPs shrink."""
    from rljax.dpo import add_completion_positions, make_dpo_loss, make_reference_logps_fn

    module, params = F.tiny_gpt2(n_layer=1, vocab_size=WIDE_VOCAB)
    full = _dpo_pairs(16, 32, (16, 20))
    windowed = add_completion_positions(full, pad_to_multiple_of=8)
    assert windowed["chosen_completion_positions"].shape == (16, 16)
    grad = jax.jit(jax.value_and_grad(make_dpo_loss(module), has_aux=True))
    (loss_w, metrics_w), grads_w = grad(params, windowed, None)
    (loss_f, metrics_f), grads_f = grad(params, full, None)
    np.testing.assert_allclose(float(loss_w), float(loss_f), rtol=1e-6)
    for k in metrics_f:
        np.testing.assert_allclose(float(metrics_w[k]), float(metrics_f[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(grads_w), jax.tree_util.tree_leaves(grads_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    ratio = _work(grad.lower(params, windowed, None).compile()) / _work(grad.lower(params, full, None).compile())
    assert ratio <= 0.7, f"DPO loss gradient with the head on the completions: {ratio:.3f} of the full-head FLOPs"
    ref = make_reference_logps_fn(module)
    ratio = _work(ref.lower(params, windowed).compile()) / _work(ref.lower(params, full).compile())
    assert ratio <= 0.7, f"DPO reference forward with the head on the completions: {ratio:.3f} of the full-head FLOPs"
