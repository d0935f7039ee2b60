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
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt_layers", type=int, default=2)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} host cores\n")

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


if __name__ == "__main__":
    main()
