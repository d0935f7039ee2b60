"""bfloat16 on XLA:CPU: which matmuls reach the CPU's bf16 units, and what PPO's mixed precision
(``PPOConfig(accelerator_kwargs={"mixed_precision": "bf16"})``, i.e. the model rebuilt with
``dtype=bfloat16`` on float32 params) costs per PPO update here. Not a test.

Sections of the markdown output:

  matmuls    GFLOP/s of one jitted dot at bench_ppo.py's shapes (GPT-2-small MLP and LM head on a
             PPO minibatch of 4 x 80 tokens): float32; bfloat16 inputs with a bfloat16 result (what
             a flax layer with dtype=bfloat16 emits); bfloat16 inputs with a float32 result
             (``preferred_element_type``); and the weight-gradient form x^T @ g, which contracts
             the rows (dimension 0 of both operands). "(lib)" marks a dot the compiled HLO hands
             to a library kernel (``__ynn_fusion``/``__xnn_fusion``/oneDNN)
             rather than XLA's own loop emitter.
  ppo update one PPO minibatch update (make_ppo_step, 1 epoch, 4 rows x (16 + 64) tokens, head on the
             64 response columns), float32 vs the mixed-precision module, median seconds.

  python experiments/benchmarks/bench_bf16.py [--quick] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

from _report import emit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model only in the PPO section, fewer repetitions")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (process affinity)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    return p.parse_args(argv)


def library_fused(compiled_text: str) -> bool:
    return any(k in compiled_text for k in ("__ynn_fusion", "__xnn_fusion", "__onednn", "onednn"))


def matmul_rows(reps: int):
    import jax
    import jax.numpy as jnp
    from jax import lax

    from bench_mfu import VOCAB, median_time

    f32, bf16 = jnp.float32, jnp.bfloat16
    nn_ = (((1,), (0,)), ((), ()))  # x [M, K] @ w [K, N]
    nt = (((1,), (1,)), ((), ()))  # x [M, K] @ e[N, K]^T (the tied LM head; dx of a dense layer)
    tn = (((0,), (0,)), ((), ()))  # x[M, K]^T @ g [M, N] (a dense layer's weight gradient)
    cases = [  # label, lhs shape, rhs shape, dimension numbers
        ("MLP fwd [320, 768] x [768, 3072]", (320, 768), (768, 3072), nn_),
        ("MLP dx [320, 3072] x [768, 3072]^T", (320, 3072), (768, 3072), nt),
        ("MLP dW [320, 768]^T x [320, 3072]", (320, 768), (320, 3072), tn),
        (f"head fwd [256, 768] x [{VOCAB}, 768]^T", (256, 768), (VOCAB, 768), nt),
    ]
    variants = [("float32", f32, None), ("bf16 -> bf16", bf16, None), ("bf16 -> f32", bf16, f32)]
    rows = []
    for label, ls, rs, dims in cases:
        m, k = (ls[1], ls[0]) if dims == tn else ls
        n = rs[1] if dims in (nn_, tn) else rs[0]
        flops = 2 * m * k * n
        row = [label]
        for _, dt, pet in variants:
            a = jnp.ones(ls, dt)
            b = jnp.ones(rs, dt)
            f = jax.jit(lambda a, b, dims=dims, pet=pet: lax.dot_general(a, b, dims, preferred_element_type=pet))
            compiled = f.lower(a, b).compile()
            secs = median_time(lambda: jax.block_until_ready(compiled(a, b)), reps)
            row.append(f"{flops / secs / 1e9:,.0f}{' (lib)' if library_fused(compiled.as_text()) else ''}")
        rows.append(row)
    return [v[0] for v in variants], rows


def ppo_update(name: str, reps: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_mfu import MB, build, median_time, ppo_config, ppo_inputs
    from rljax.ppo_train import PPOTrainState, make_ppo_step
    from rljax.rollout import make_forward_rollout
    from rljax.trainers.base import module_in_dtype

    module, params, ref_params, _, _ = build(name)
    q, qm, r, rm = ppo_inputs(MB)
    rollout = jax.jit(make_forward_rollout(module, "kl"))(params, ref_params, q, qm, r, rm)
    scores = jnp.asarray(np.linspace(0, 1, MB), jnp.float32)
    cfg = ppo_config(MB, 1)
    out = {}
    for label, mod in (("float32", module), ("mixed bf16", module_in_dtype(module, jnp.bfloat16))):
        step = jax.jit(make_ppo_step(mod, cfg))
        state = PPOTrainState.create(params, ref_params, cfg)
        t0 = time.perf_counter()
        compiled = step.lower(state, rollout, scores).compile()
        compile_s = time.perf_counter() - t0
        _, stats = compiled(state, rollout, scores)
        secs = median_time(lambda: jax.block_until_ready(compiled(state, rollout, scores)), reps, budget_s=60)
        out[label] = (secs, compile_s, float(stats["ppo/loss/total"]))
    return out


def main(argv=None):
    args = parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import jax

    reps = 3 if args.quick else 7
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    lines = [
        "bfloat16 on XLA:CPU: matmul paths and PPO mixed precision",
        "",
        f"- date {datetime.date.today()}; {os.uname().machine}, {args.threads} threads; jax {jax.__version__}; "
        f"load average (1 min) at start {load:.1f}",
        "",
        "### Matmul GFLOP/s (median of repeated calls; (lib) = handed to a library kernel)",
        "",
    ]
    heads, rows = matmul_rows(reps)
    lines += ["| dot | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "### One PPO minibatch update (4 rows x 80 tokens, 1 epoch), seconds", "",
              "| model | float32 s | mixed bf16 s | mixed / float32 time | compile s (f32 / bf16) | loss f32 / bf16 |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in (("tiny",) if args.quick else ("tiny", "small")):
        res = ppo_update(name, reps)
        (a, ca, la), (b, cb, lb) = res["float32"], res["mixed bf16"]
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {ca:.1f} / {cb:.1f} | {la:.4f} / {lb:.4f} |")
    lines += ["", f"_{time.perf_counter() - t_start:.0f} s; load average (1 min) at end {os.getloadavg()[0]:.1f}._"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
