"""Sharding and checkpoint benchmark (CPU, simulated devices). Not a test.

    python experiments/benchmarks/bench_sharding.py [--steps 20] [--ckpt_layers 2]

Prints a markdown table:

1. Per-device bytes of params + AdamW state of a GPT-2-small-shaped model (124M) on
   meshes (data, fsdp, model), from ``jax.eval_shape`` + the partition rules (nothing
   is allocated): the bytes device 0 would hold.
2. SFT step time of a tiny GPT-2 on 1 device vs 8 simulated CPU devices (the 8 share
   the host's cores, so expect no speedup; this measures sharding overhead).
3. Checkpoint save (async call + until committed) / restore time and size on disk
   for a GPT-2-width model with few layers.
4. Per-device work on a data=4 mesh: FLOPs one device runs (XLA's ``cost_analysis`` of the
   compiled program, loop bodies counted once) for the PPO step, the rollout forward, SFT
   and DPO steps with gradient accumulation, the DPO reference forward and generation, as a
   fraction of the single-device program; with rljax's batch constraints
   (``rljax.sharding.constrain_batch``) and with them switched off (the layout before they
   existed). Only compiles. ``--only_work`` prints this table alone.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rljax import sharding as S  # noqa: E402
from rljax.checkpoint import Checkpointer  # noqa: E402
from rljax.models import abstract_params, init_params  # noqa: E402
from rljax.models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from rljax.sft import make_sft_loss  # noqa: E402
from rljax.train_state import TrainState  # noqa: E402
from rljax.trainers.base import TrainingArguments, make_optimizer, make_train_step  # noqa: E402

MiB = 2**20


def _tx():
    return make_optimizer(TrainingArguments(learning_rate=1e-4, weight_decay=0.01), 1000)


def memory_rows():
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 124M params
    tx = _tx()
    abstract = jax.eval_shape(lambda: TrainState.create(abstract_params_real(model), tx))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
    rows = []
    for shape in ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)):
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = S.make_mesh(*shape, devices=devices)
        sh = S.state_shardings(abstract, mesh)
        placed = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        p = S.per_device_bytes(placed.params, devices[0])
        o = S.per_device_bytes(placed.opt_state, devices[0])
        rows.append((shape, p, o))
    return n_params, rows


def abstract_params_real(model):
    """Abstract params usable inside eval_shape (zeros of the right shapes)."""
    shapes = abstract_params(model)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _batch(b=16, s=64, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(b, s)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}


def step_time_rows(steps: int):
    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    module = GPT2LMHeadModel(cfg)
    params = init_params(module, jax.random.PRNGKey(0))
    loss = make_sft_loss(module)
    rows = []
    for name, shape in (("1 device", None), ("8 devices (8,1,1)", (8, 1, 1)), ("8 devices (1,8,1)", (1, 8, 1)),
                        ("8 devices (2,2,2)", (2, 2, 2))):
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), _tx())
        if shape is None:
            step = make_train_step(loss)
            put = lambda b: b  # noqa: E731
        else:
            mesh = S.make_mesh(*shape)
            state = S.shard_params(state, mesh)
            sh = S.state_shardings(state, mesh)
            step = S.jit_sharded(make_train_step(loss), mesh, (sh, S.batch_sharding(mesh)), (sh, S.replicated(mesh)),
                                 donate_argnums=(0,))
            put = lambda b, mesh=mesh: S.shard_batch(b, mesh)  # noqa: E731
        t0 = time.perf_counter()
        state, m = step(state, put(_batch()))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps):
            b = put(_batch(seed=i + 1))
            t0 = time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready((state.params, m))
            times.append(time.perf_counter() - t0)
        rows.append((name, compile_s, float(np.median(times)) * 1e3, float(m["loss"])))
    return rows


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def checkpoint_rows(layers: int):
    cfg = GPT2Config(n_layer=layers)  # GPT-2 small width and vocab, fewer layers
    module = GPT2LMHeadModel(cfg)
    params = init_params(module, jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    rows = []
    for shape in ((8, 1, 1), (1, 8, 1)):
        mesh = S.make_mesh(*shape)
        state = S.shard_params(TrainState.create(params, _tx()), mesh)
        jax.block_until_ready(state)
        root = tempfile.mkdtemp(prefix="rljax_bench_ckpt_")
        try:
            ck = Checkpointer(os.path.join(root, "c"), async_save=True)
            t0 = time.perf_counter()
            ck.save(1, state)  # the first save of a layout pays one-off orbax/tensorstore setup
            ck.wait_until_finished()
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ck.save(2, state, extra={"data_position": 0})
            call_s = time.perf_counter() - t0
            ck.wait_until_finished()
            total_s = time.perf_counter() - t0
            size = _dir_bytes(os.path.join(root, "c", "2"))
            template = jax.eval_shape(lambda: state)
            t0 = time.perf_counter()
            restored, _ = ck.restore(target_state=template, mesh=S.make_mesh(2, 4, 1))
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t0
            ck.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append((shape, n_params, first_s, call_s, total_s, restore_s, size))
    return rows


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def work_rows():
    """(program, FLOPs on 1 device, ratio data=4, ratio data=4 without constraints, ratio (2,2,2))."""
    import contextlib
    import sys
    from unittest import mock

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
    import _mesh_fixtures as F  # tiny models and batches of the test suite

    from rljax import dpo, generation
    from rljax import ppo_train as PT
    from rljax.trainers import base

    def compile_on(fn, args, shardings, shape):
        if shape is None:
            return jax.jit(fn).lower(*args).compile()
        mesh = S.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        return S.jit_sharded(fn, mesh, in_shardings=shardings(mesh)).lower(*args).compile()

    @contextlib.contextmanager
    def constraints_off():
        off = lambda tree, *a, **k: tree  # noqa: E731
        with contextlib.ExitStack() as stack:
            for mod in (S, PT, dpo, generation):
                stack.enter_context(mock.patch.object(mod, "constrain_batch", off))
            yield

    config = F.ppo_config(batch_size=32, mini_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=2)
    vmodule, vparams = F.tiny_value_model()
    q, qm, r, rm = F.ppo_inputs(32, query_len=12, response_len=12)
    state = PT.PPOTrainState.create(vparams, vparams, config)
    fwd = PT.make_forward_rollout(vmodule)
    rollout = jax.eval_shape(fwd, vparams, vparams, q, qm, r, rm)
    scores = jax.ShapeDtypeStruct((32,), np.float32)
    rows_sh = S.batch_sharding
    module, params = F.tiny_gpt2(n_layer=1)
    sft_state = F.sft_state(module, params)
    sft = F.sft_batch(32, seq_len=24)
    rng = np.random.default_rng(3)
    pairs = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, F.VOCAB, size=(32, 24)).astype(np.int32)
        pairs.update({f"{side}_input_ids": ids, f"{side}_attention_mask": np.ones_like(ids), f"{side}_labels": ids})
    pairs["reference_chosen_logps"] = pairs["reference_rejected_logps"] = np.zeros((32,), np.float32)
    gq, gqm, _, _ = F.ppo_inputs(32, query_len=8)
    programs = [
        ("PPO step (B=32, mb=8, GA=2, 2 epochs, 12+12 tokens)", lambda: PT.make_ppo_step(vmodule, config),
         (state, rollout, scores), lambda m: (S.state_shardings(state, m), rows_sh(m), rows_sh(m))),
        ("rollout forward (policy + reference)", lambda: fwd, (vparams, vparams, q, qm, r, rm),
         lambda m: (S.param_shardings(vparams, m),) * 2 + (rows_sh(m),) * 4),
        ("SFT step (32 x 24, GA=2)", lambda: base.make_train_step(make_sft_loss(module), 2, donate=False),
         (sft_state, sft), lambda m: (S.state_shardings(sft_state, m), rows_sh(m))),
        ("DPO step (32 pairs x 24, GA=2)", lambda: base.make_train_step(dpo.make_dpo_loss(module), 2, donate=False),
         (sft_state, pairs), lambda m: (S.state_shardings(sft_state, m), rows_sh(m))),
        ("DPO reference forward", lambda: dpo.make_reference_logps_fn(module), (params, pairs),
         lambda m: (S.param_shardings(params, m), rows_sh(m))),
        ("greedy generation (32 x 8 + 8 new)", lambda: functools.partial(generation.make_generate_fn(
            module, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0, jit=False)),  # a fresh trace
         (params, gq, gqm, jax.random.PRNGKey(0)), lambda m: (S.param_shardings(params, m), rows_sh(m), rows_sh(m),
                                                              S.replicated(m))),
    ]
    rows = []
    for name, build, args, shardings in programs:
        one = _flops(compile_on(build(), args, shardings, None))
        d4 = _flops(compile_on(build(), args, shardings, (4, 1, 1))) / one
        with constraints_off():
            d4_off = _flops(compile_on(build(), args, shardings, (4, 1, 1))) / one
        m222 = _flops(compile_on(build(), args, shardings, (2, 2, 2))) / one
        rows.append((name, one, d4, d4_off, m222))
    return rows


def print_work_rows():
    print("### Per-device work on a data=4 mesh (XLA cost_analysis FLOPs / the 1-device program's)\n")
    print("| program (tiny 1-layer GPT-2) | FLOPs, 1 device | data=4 | data=4, constraints off | (2,2,2) |")
    print("|---|---:|---:|---:|---:|")
    for name, one, d4, d4_off, m222 in work_rows():
        print(f"| {name} | {one / 1e6:.2f}M | {d4:.3f} | {d4_off:.3f} | {m222:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt_layers", type=int, default=2)
    ap.add_argument("--only_work", action="store_true", help="print only the per-device work table")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} host cores\n")
    if args.only_work:
        print_work_rows()
        return

    n_params, rows = memory_rows()
    print(f"### Per-device memory, GPT-2 small ({n_params / 1e6:.1f}M params), fp32 params + AdamW state\n")
    print("| mesh (data, fsdp, model) | params / device (MiB) | opt state / device (MiB) | total / device (MiB) | vs 1 device |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][1] + rows[0][2]
    for shape, p, o in rows:
        print(f"| {shape} | {p / MiB:.1f} | {o / MiB:.1f} | {(p + o) / MiB:.1f} | {(p + o) / base:.3f} |")

    print(f"\n### SFT step, tiny GPT-2 (2 layers, 128 wide), batch 16 x 64, median of {args.steps} steps\n")
    print("| run | first call incl. compile (s) | step (ms) | loss after |")
    print("|---|---:|---:|---:|")
    for name, c, t, l in step_time_rows(args.steps):
        print(f"| {name} | {c:.2f} | {t:.1f} | {l:.4f} |")

    print(f"\n### Checkpoint (TrainState: params + AdamW), GPT-2 width/vocab, {args.ckpt_layers} layers\n")
    print("| saved from mesh | params | first save, committed (s) | save() returns (s) | until committed (s) "
          "| restore onto (2,4,1), CRC-verified (s) | size on disk (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, n, first_s, call_s, total_s, restore_s, size in checkpoint_rows(args.ckpt_layers):
        print(f"| {shape} | {n / 1e6:.1f}M | {first_s:.2f} | {call_s:.2f} | {total_s:.2f} | {restore_s:.2f} | {size / MiB:.1f} |")
    print()
    print_work_rows()


if __name__ == "__main__":
    main()
