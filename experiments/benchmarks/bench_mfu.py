"""FLOPs per PPO iteration vs the minimum, MFU against the measured matmul peak, and where
rljax's PPO step time goes. CPU, float32. Not a test.

Sections of the markdown output:

  peak       measured fp32 matmul throughput at ``--threads`` threads (process CPU affinity;
             ``torch.set_num_threads`` too): JAX (XLA:CPU) here, PyTorch in the TRL venv
             (a subprocess), square 2048^3 and the models' shapes ([tokens, d] x [d, V] with the
             tied [V, d] embedding, as the LM head computes it; [tokens, d] x [d, 4d] MLP).
  flops      FLOPs of one PPO iteration of bench_ppo.py's workload (16 prompts padded to 16
             tokens, 64 new tokens, 4 epochs x 4 minibatches of 4) from the compiled programs'
             ``cost_analysis()['flops']`` vs the minimal analytic count (matmuls + attention,
             LM head only on the response window; backward = 2x forward). XLA counts a while /
             scan body once, so loops are composed by hand from loop-free programs:
               generation = F(max_new_tokens=1) + (N - 1) * (F(N) - F(1))   [F(N) holds one decode body]
               rollout    = the unchunked forward (chunking changes memory, not FLOPs)
               PPO step   = epochs * n_minibatches * F(step on one minibatch, 1 epoch)
             (the last overcounts the [B, N] advantage work 16 times: negligible).
  mfu        analytic FLOPs / measured seconds / JAX's measured square peak, for rljax's PPO
             step, PPO iteration and SFT step (bench_trainers.py's 8 x 128 batch); TRL's with the
             same FLOPs and its own times (bench_ppo.py's / bench_trainers.py's TRL workers).
  breakdown  rljax's PPO minibatch update at the tiny shape (GPT-2 4L d256, vocab 50257, 4 rows
             x 80 tokens, head on 64) timed as sub-programs: whole grad step, forward only, LM
             head matmul fwd / fwd+bwd, log-softmax + gather + entropy fwd / fwd+bwd on the
             [4, 64, 50257] logits, the trunk without the head, the Adam update.
  xla flags  (``--ab-flags``) the tiny PPO minibatch grad step and the head matmul under XLA
             flag sets, each in a fresh subprocess, alternated A/B/A/B.

  python experiments/benchmarks/bench_mfu.py [--quick] [--threads 2] [--models tiny,small]
      [--no-trl] [--ab-flags] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _report import emit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TRL_PYTHON = os.path.join(ROOT, ".trl-venv", "bin", "python")
VOCAB, EOS = 50257, 50256
MODELS = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
}
# bench_ppo.py's workload (prompts of 4-15 tokens are left-padded to the 16 bucket)
B, MB, EPOCHS, P, N = 16, 4, 4, 16, 64
# bench_trainers.py's SFT batch
SFT_B, SFT_T = 8, 128
FLAG_SETS = {
    "default": "",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions; timings (and TRL) for the tiny model only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL timings (MFU rows for rljax only)")
    p.add_argument("--ab-flags", action="store_true", help="A/B the XLA flag sets on the tiny PPO minibatch step")
    p.add_argument("--ab-rounds", type=int, default=2)
    p.add_argument("--ab-only", action="store_true", help="only the XLA flags A/B (implies --ab-flags)")
    p.add_argument("--trl-python", default=TRL_PYTHON)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["torch_peak", "flags"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=5, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pin(threads: int) -> None:
    """Pin this process to ``threads`` CPUs before jax / torch size their thread pools."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def median_time(fn, reps: int, budget_s: float = 20.0) -> float:
    """Median seconds of ``fn()`` (which blocks) over ``reps`` calls after one warm-up, fewer if over budget."""
    fn()
    times, t_start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s and len(times) >= 1:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------------
# Matmul shapes (shared by both frameworks): name -> (M, K, N, rhs stored [N, K] = tied embedding)
# ---------------------------------------------------------------------------


def matmul_shapes(models):
    shapes = {"square 2048^3": (2048, 2048, 2048, False, "float32")}
    for name in models:
        d = MODELS[name]["n_embd"]
        shapes[f"{name} head, PPO minibatch [{MB * N}, {d}] x [{d}, V]"] = (MB * N, d, VOCAB, True, "float32")
        shapes[f"{name} head, SFT batch [{SFT_B * SFT_T}, {d}] x [{d}, V]"] = (SFT_B * SFT_T, d, VOCAB, True,
                                                                              "float32")
        shapes[f"{name} MLP, PPO minibatch [{MB * (P + N)}, {d}] x [{d}, {4 * d}]"] = (MB * (P + N), d, 4 * d, False,
                                                                                     "float32")
    # not float32: what the CPU's bf16 units (AMX on this Xeon) give each framework, for reference
    shapes["square 2048^3, bfloat16 inputs"] = (2048, 2048, 2048, False, "bfloat16")
    return shapes


def jax_peak(shapes, reps):
    import jax
    import jax.numpy as jnp

    out = {}
    for name, (m, k, n, tied, dtype) in shapes.items():
        x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(dtype)
        w = jax.random.normal(jax.random.PRNGKey(1), (n, k) if tied else (k, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda a, b: a @ b.T) if tied else jax.jit(lambda a, b: a @ b)
        dt = median_time(lambda: f(x, w).block_until_ready(), reps)
        out[name] = 2.0 * m * k * n / dt
    return out


def torch_peak_worker(shapes, reps, threads):
    import torch

    torch.set_num_threads(threads)
    out = {}
    with torch.no_grad():
        for name, (m, k, n, tied, dtype) in shapes.items():
            x = torch.randn(m, k).to(getattr(torch, dtype))
            w = (torch.randn(n, k) if tied else torch.randn(k, n)).to(getattr(torch, dtype))
            f = (lambda: x @ w.T) if tied else (lambda: x @ w)
            dt = median_time(f, reps)
            out[name] = 2.0 * m * k * n / dt
    return dict(peak=out, torch=torch.__version__, threads=torch.get_num_threads())


# ---------------------------------------------------------------------------
# Analytic (minimal) FLOPs: matmuls + attention, causal, head only where it is used
# ---------------------------------------------------------------------------


def fwd_flops(name: str, rows: int, seq: int, head_cols: int, value_head: bool = False) -> float:
    """Forward matmul FLOPs of ``rows`` sequences of ``seq`` tokens, LM head on ``head_cols`` columns."""
    m = MODELS[name]
    L, d = m["n_layer"], m["n_embd"]
    body = 24 * L * d * d * seq  # qkv 3d^2 + out d^2 + MLP 8d^2, 2 FLOPs per MAC
    attn = 4 * L * d * seq * (seq + 1) / 2  # QK^T and AV over the causal prefix
    head = 2 * d * VOCAB * head_cols + (2 * d * seq if value_head else 0)
    return rows * (body + attn + head)


def n_params(name: str) -> int:
    m = MODELS[name]
    L, d = m["n_layer"], m["n_embd"]
    return VOCAB * d + 1024 * d + L * (12 * d * d + 13 * d) + 2 * d


def analytic_ppo(name: str) -> dict:
    m = MODELS[name]
    L, d = m["n_layer"], m["n_embd"]
    # generation: prefill P tokens (head on the last column), then N - 1 one-token steps over a growing cache
    gen = fwd_flops(name, B, P, 1)
    for t in range(1, N):
        ctx = P + t
        gen += B * (24 * L * d * d + 4 * L * d * ctx + 2 * d * VOCAB)
    rollout = 2 * fwd_flops(name, B, P + N, N, value_head=True)  # policy + reference
    adam = 12 * n_params(name)  # clip + Adam, ~12 FLOPs per parameter per update
    step = EPOCHS * 3 * fwd_flops(name, B, P + N, N, value_head=True) + EPOCHS * (B // MB) * adam
    return dict(generation=gen, rollout=rollout, step=step, total=gen + rollout + step)


def analytic_sft(name: str) -> float:
    return 3 * fwd_flops(name, SFT_B, SFT_T, SFT_T) + 12 * n_params(name)


# ---------------------------------------------------------------------------
# rljax programs
# ---------------------------------------------------------------------------


def build(name: str):
    """(value-head module, params, ref_params) with random weights."""
    import jax

    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, bos_token_id=EOS, eos_token_id=EOS, **MODELS[name])
    lm = model_from_config(cfg)
    lm_params = init_params(lm, jax.random.PRNGKey(0))
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, lm_params)
    params = model.params
    ref_params = jax.tree_util.tree_map(lambda x: x.copy(), params)
    return model.module, params, ref_params, lm, lm_params


def ppo_inputs(rows: int):
    import numpy as np

    rs = np.random.RandomState(0)
    q = rs.randint(0, EOS, (rows, P)).astype(np.int32)
    qm = np.ones((rows, P), np.int32)
    qm[:, : rows % 4] = 0  # some left padding
    r = rs.randint(0, EOS, (rows, N)).astype(np.int32)
    rm = np.ones((rows, N), np.int32)
    return q, qm, r, rm


def flops_of(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def ppo_config(batch: int, epochs: int):
    from rljax import PPOConfig

    return PPOConfig(batch_size=batch, mini_batch_size=MB, ppo_epochs=epochs, seed=0)


def ppo_programs(name: str, timings: bool, reps: int) -> dict:
    """Compiled FLOPs (loops composed by hand) and, with ``timings``, seconds of rljax's PPO pieces."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.generation import make_generate_fn
    from rljax.ppo_train import PPOTrainState, make_ppo_step
    from rljax.rollout import make_forward_rollout

    module, params, ref_params, _, _ = build(name)
    q, qm, r, rm = ppo_inputs(B)
    res, secs, compile_s = {}, {}, {}

    # generation
    rng = jax.random.PRNGKey(0)
    gens = {}
    for n_new in (1, N):
        g = make_generate_fn(module, max_new_tokens=n_new, do_sample=True, top_k=0, top_p=1.0,
                             min_new_tokens=n_new, eos_token_id=EOS, pad_token_id=EOS)
        t0 = time.perf_counter()
        gens[n_new] = g.lower(params, q, qm, rng).compile()
        compile_s[f"generation({n_new})"] = time.perf_counter() - t0
    f1, fn = flops_of(gens[1]), flops_of(gens[N])
    res["generation"] = f1 + (N - 1) * (fn - f1)
    res["generation, as reported (loop body once)"] = fn
    if timings:
        g = make_generate_fn(module, max_new_tokens=N, do_sample=True, top_k=0, top_p=1.0,
                             min_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS)
        secs["generation"] = median_time(lambda: jax.block_until_ready(g(params, q, qm, rng)), reps)

    # rollout forward (policy + reference): unchunked = the chunked program's total
    fwd_full = jax.jit(make_forward_rollout(module, "kl", chunk_size=None))
    fwd_chunked = jax.jit(make_forward_rollout(module, "kl", chunk_size=MB))
    res["rollout"] = flops_of(fwd_full.lower(params, ref_params, q, qm, r, rm).compile())
    t0 = time.perf_counter()
    c = fwd_chunked.lower(params, ref_params, q, qm, r, rm).compile()
    compile_s["rollout"] = time.perf_counter() - t0
    res["rollout, chunked as reported (lax.map body once)"] = flops_of(c)
    if timings:
        secs["rollout"] = median_time(
            lambda: jax.block_until_ready(fwd_chunked(params, ref_params, q, qm, r, rm)), reps)

    # PPO step: one minibatch, one epoch = one loop-free update
    rollout = fwd_full(params, ref_params, q, qm, r, rm)
    scores = jnp.asarray(np.linspace(0, 1, B), jnp.float32)
    cfg1 = ppo_config(MB, 1)
    step1 = jax.jit(make_ppo_step(module, cfg1))
    state1 = PPOTrainState.create(params, ref_params, cfg1)
    roll1 = jax.tree_util.tree_map(lambda x: x[:MB] if x is not None else None, rollout)
    f_mb = flops_of(step1.lower(state1, roll1, scores[:MB]).compile())
    res["PPO step"] = EPOCHS * (B // MB) * f_mb
    cfg = ppo_config(B, EPOCHS)
    step = jax.jit(make_ppo_step(module, cfg), donate_argnums=(0,))
    copy = lambda t: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731
    state = PPOTrainState.create(copy(params), ref_params, cfg)
    t0 = time.perf_counter()
    c = step.lower(state, rollout, scores).compile()
    compile_s["PPO step"] = time.perf_counter() - t0
    res["PPO step, as reported (scan bodies once)"] = flops_of(c)
    if timings:
        box = [state]

        def run():
            box[0], stats = c(box[0], rollout, scores)
            jax.block_until_ready(stats)

        secs["PPO step"] = median_time(run, max(1, reps // 2), budget_s=60)
    res["total"] = res["generation"] + res["rollout"] + res["PPO step"]
    return dict(flops=res, seconds=secs, compile=compile_s)


def sft_program(name: str, timings: bool, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.sft import make_sft_loss
    from rljax.train_state import TrainState
    from rljax.trainers.base import TrainingArguments, make_optimizer, make_train_step

    _, _, _, lm, lm_params = build(name)
    ids = np.random.RandomState(0).randint(0, EOS, (SFT_B, SFT_T)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=ids)
    args = TrainingArguments(per_device_train_batch_size=SFT_B, max_steps=100, seed=0)
    step = make_train_step(make_sft_loss(lm))
    state = TrainState.create(jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), lm_params),
                              make_optimizer(args, 100), jax.random.PRNGKey(0))
    c = step.lower(state, batch).compile()
    out = dict(flops=flops_of(c))
    if timings:
        box = [state]

        def run():
            box[0], metrics = c(box[0], batch)
            jax.block_until_ready(metrics)

        out["seconds"] = median_time(run, reps, budget_s=40)
    return out


def breakdown(reps: int) -> dict:
    """Seconds of sub-programs of one PPO minibatch update at the tiny shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.core import logprobs_and_entropy
    from rljax.models.attention import apply_windowed
    from rljax.ppo_train import PPOTrainState, make_ppo_optimizer, make_ppo_step
    from rljax.rollout import make_forward_rollout, response_window, sequence_inputs

    name = "tiny"
    module, params, ref_params, _, _ = build(name)
    q, qm, r, rm = ppo_inputs(MB)
    ids, am, pos, _ = sequence_inputs(jnp.asarray(q), jnp.asarray(qm), jnp.asarray(r), jnp.asarray(rm))
    window = response_window(P, N)
    d = MODELS[name]["n_embd"]
    emb_path = None
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if leaf.shape == (VOCAB, d):
            emb_path = path
    assert emb_path is not None, "tied embedding not found"
    E = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if path == emb_path][0]
    x = jax.random.normal(jax.random.PRNGKey(2), (MB, N, d), jnp.float32)
    logits = jax.random.normal(jax.random.PRNGKey(3), (MB, N, VOCAB), jnp.float32)

    def loss_full(p):
        out = apply_windowed(module, {"params": p}, ids, am, pos, deterministic=True, logits_window=window)
        lp, ent = logprobs_and_entropy(out.logits, r)
        return jnp.mean(lp) + 0.01 * jnp.mean(ent) + jnp.mean(out.values ** 2)

    def loss_trunk(p):  # head on one column: the trunk (+ 1/64 of the head)
        out = apply_windowed(module, {"params": p}, ids, am, pos, deterministic=True,
                             logits_window=(P + N - 1, 1))
        return jnp.mean(out.logits) + jnp.mean(out.values ** 2)

    def head(xx, ee):
        return jnp.mean(jnp.einsum("bnd,vd->bnv", xx, ee))

    def lse(lg):
        lp, ent = logprobs_and_entropy(lg, r)
        return jnp.mean(lp) + 0.01 * jnp.mean(ent)

    progs = {
        "forward only (policy, head on the window, log-probs + entropy)": (jax.jit(loss_full), (params,)),
        "forward + backward (value_and_grad of the same loss)": (jax.jit(jax.value_and_grad(loss_full)), (params,)),
        "trunk forward + backward (head on 1 column)": (jax.jit(jax.value_and_grad(loss_trunk)), (params,)),
        f"LM head matmul fwd [{MB * N}, {d}] x [{d}, V]": (jax.jit(head), (x, E)),
        "LM head matmul fwd + bwd (dx, dE)": (jax.jit(jax.value_and_grad(head, argnums=(0, 1))), (x, E)),
        f"log-softmax + gather + entropy fwd on [{MB}, {N}, V]": (jax.jit(lse), (logits,)),
        "log-softmax + gather + entropy fwd + bwd": (jax.jit(jax.value_and_grad(lse)), (logits,)),
    }
    cfg1 = ppo_config(MB, 1)
    tx = make_ppo_optimizer(cfg1)
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda x: 1e-3 * jnp.ones_like(x), params)

    def adam(g, o, p):
        import optax

        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    progs["Adam update (+ global-norm clip)"] = (jax.jit(adam), (grads, opt_state, params))
    fwd = jax.jit(make_forward_rollout(module, "kl"))
    q4, qm4, r4, rm4 = ppo_inputs(MB)
    rollout = fwd(params, ref_params, q4, qm4, r4, rm4)
    scores = jnp.asarray(np.linspace(0, 1, MB), jnp.float32)
    step1 = jax.jit(make_ppo_step(module, cfg1))
    state1 = PPOTrainState.create(params, ref_params, cfg1)
    progs["whole PPO update on one minibatch (make_ppo_step, 1 epoch, batch 4)"] = (step1, (state1, rollout, scores))
    out = {}
    for label, (f, a) in progs.items():
        out[label] = median_time(lambda: jax.block_until_ready(f(*a)), reps)
        print(f"  breakdown: {label}: {out[label] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return out


def flags_worker(reps: int) -> dict:
    """Under this process's XLA_FLAGS: the tiny PPO one-minibatch update and the head matmul."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.ppo_train import PPOTrainState, make_ppo_step
    from rljax.rollout import make_forward_rollout

    module, params, ref_params, _, _ = build("tiny")
    q, qm, r, rm = ppo_inputs(MB)
    rollout = jax.jit(make_forward_rollout(module, "kl"))(params, ref_params, q, qm, r, rm)
    scores = jnp.asarray(np.linspace(0, 1, MB), jnp.float32)
    cfg1 = ppo_config(MB, 1)
    step1 = jax.jit(make_ppo_step(module, cfg1))
    state1 = PPOTrainState.create(params, ref_params, cfg1)
    t_step = median_time(lambda: jax.block_until_ready(step1(state1, rollout, scores)), reps)
    x = jax.random.normal(jax.random.PRNGKey(0), (MB * N, 256), jnp.float32)
    E = jax.random.normal(jax.random.PRNGKey(1), (VOCAB, 256), jnp.float32)
    f = jax.jit(lambda a, b: a @ b.T)
    t_head = median_time(lambda: f(x, E).block_until_ready(), reps)
    return dict(step=t_step, head=t_head)


# ---------------------------------------------------------------------------
# TRL times (bench_ppo.py's / bench_trainers.py's workers)
# ---------------------------------------------------------------------------


def trl_times(name: str, threads: int, trl_python: str, ppo_iters: int, sft_steps: int) -> dict:
    sys.path.insert(0, HERE)
    import bench_ppo
    import bench_trainers

    out = {}
    with tempfile.TemporaryDirectory() as dd:
        bench_ppo.write_checkpoint(name, dd)
        t = bench_ppo.run_side(trl_python, "trl", dd, ppo_iters, threads)
        out["ppo_iter"], out["ppo_generate"] = t["median"], t["generate"]
    with tempfile.TemporaryDirectory() as dd:
        bench_trainers.write_checkpoint(name, dd)
        t = bench_trainers.run_trl(trl_python, dd, sft_steps, ["sft"], threads)
        out["sft"] = t["sft"]["median"]
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def sub(cmd, env=None) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flush(lines, out) -> None:
    """Write the sections done so far (a slow, loaded run that is cut short keeps them)."""
    if out:
        with open(out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


def g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def main():
    args = parse_args()
    pin(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    reps = 3 if args.quick else args.reps
    if args.worker == "torch_peak":
        print(json.dumps(torch_peak_worker(matmul_shapes(models), reps, args.threads)))
        return
    if args.worker == "flags":
        print(json.dumps(flags_worker(reps)))
        return
    t_start, load0 = time.time(), os.getloadavg()[0]
    import jax

    lines = [f"FLOPs and MFU, CPU float32, {args.threads} threads (process affinity), "
             f"{'quick' if args.quick else 'full'} run", "",
             f"- date {datetime.date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs; "
             f"jax {jax.__version__}; load average (1 min) at start {load0:.1f}"]

    if args.ab_only:
        args.ab_flags, models = True, []
    # -- peak
    shapes = matmul_shapes(models)
    print("[mfu] matmul peak (jax)", file=sys.stderr, flush=True)
    jp = jax_peak(shapes, reps)
    tp, torch_version = None, None
    if not args.no_trl and os.path.exists(args.trl_python):
        print("[mfu] matmul peak (torch)", file=sys.stderr, flush=True)
        t = sub([args.trl_python, os.path.abspath(__file__), "--worker", "torch_peak", "--threads",
                 str(args.threads), "--models", args.models] + (["--quick"] if args.quick else []),
                env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        tp, torch_version = t["peak"], t["torch"]
    peak = jp["square 2048^3"]  # always measured (matmul_shapes starts with it)
    lines += ["", "### Measured fp32 matmul throughput (GFLOP/s)", "",
              f"| shape | JAX (XLA:CPU) | PyTorch {torch_version or ''} |", "|---|---:|---:|"]
    for k in shapes:
        lines.append(f"| {k} | {jp[k] / 1e9:.1f} | {tp[k] / 1e9:.1f} |" if tp else f"| {k} | {jp[k] / 1e9:.1f} | - |")

    flush(lines, args.out)
    # -- FLOPs per iteration
    progs, sft = {}, {}
    for name in models:
        timings = name == "tiny" or not args.quick
        print(f"[mfu] PPO programs {name}", file=sys.stderr, flush=True)
        progs[name] = ppo_programs(name, timings, reps)
        print(f"  {name}: {progs[name]}", file=sys.stderr, flush=True)
        print(f"[mfu] SFT program {name}", file=sys.stderr, flush=True)
        sft[name] = sft_program(name, timings, reps)
        print(f"  {name} SFT: {sft[name]}", file=sys.stderr, flush=True)
    flops_title = (f"### FLOPs of one PPO iteration (GFLOP; batch {B}, prompt {P}, +{N} tokens, {EPOCHS} epochs x "
                   f"{B // MB} minibatches of {MB})")
    lines += [] if not models else ["", flops_title, "",
              "| model | part | compiled (loops composed) | compiled as reported | minimal analytic | "
              "compiled / minimal |", "|---|---|---:|---:|---:|---:|"]
    for name in models:
        f, a = progs[name]["flops"], analytic_ppo(name)
        rep = {"generation": f["generation, as reported (loop body once)"],
               "rollout": f["rollout, chunked as reported (lax.map body once)"],
               "PPO step": f["PPO step, as reported (scan bodies once)"]}
        for part, akey in (("generation", "generation"), ("rollout", "rollout"), ("PPO step", "step"),
                           ("total", "total")):
            lines.append(f"| {name} | {part} | {g(f[part])} | {g(rep[part]) if part in rep else ''} | "
                         f"{g(a[akey])} | {f[part] / a[akey]:.2f} |")
        lines.append(f"| {name} | SFT step ({SFT_B} x {SFT_T}) | {g(sft[name]['flops'])} | | "
                     f"{g(analytic_sft(name))} | {sft[name]['flops'] / analytic_sft(name):.2f} |")

    flush(lines, args.out)
    # -- TRL times
    trl = {}
    if not args.no_trl and os.path.exists(args.trl_python):
        for name in models:
            if args.quick and name != "tiny":
                continue
            print(f"[mfu] TRL times {name}", file=sys.stderr, flush=True)
            trl[name] = trl_times(name, args.threads, args.trl_python, 1 if (args.quick or name == "small") else 2,
                                  2 if args.quick else 3)

    # -- MFU
    mfu_title = f"### MFU (analytic minimal FLOPs / seconds / JAX's measured fp32 square peak {peak / 1e9:.1f} GFLOP/s)"
    lines += [] if not models else ["", mfu_title, "",
                                    "| model | program | GFLOP | rljax s | rljax GFLOP/s | rljax MFU | TRL s "
                                    "| TRL GFLOP/s | TRL MFU |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        a, s = analytic_ppo(name), progs[name]["seconds"]
        t = trl.get(name, {})
        rows = []
        if s:
            it = s["generation"] + s["rollout"] + s["PPO step"]
            trl_step = t["ppo_iter"] - t["ppo_generate"] if t else None
            rows += [("generation", a["generation"], s["generation"], t.get("ppo_generate")),
                     ("rollout forward + PPO step", a["rollout"] + a["step"], s["rollout"] + s["PPO step"], trl_step),
                     ("PPO step alone", a["step"], s["PPO step"], None),
                     ("PPO iteration (gen + forward + step)", a["total"], it, t.get("ppo_iter"))]
        if "seconds" in sft[name]:
            rows.append((f"SFT step {SFT_B} x {SFT_T}", analytic_sft(name), sft[name]["seconds"], t.get("sft")))
        for label, fl, rs, ts in rows:
            trl_cells = f"{ts:.3f} | {fl / ts / 1e9:.1f} | {fl / ts / peak:.0%}" if ts else "- | - | -"
            lines.append(f"| {name} | {label} | {g(fl)} | {rs:.3f} | {fl / rs / 1e9:.1f} | {fl / rs / peak:.0%} | "
                         f"{trl_cells} |")
    lines.append("")
    lines.append("" if not models else "TRL's rollout forward + PPO step = its iteration minus its generation "
                 "(bench_ppo.py's TRL worker); its SFT step: bench_trainers.py's TRL worker "
                 "(between Trainer callbacks).")

    flush(lines, args.out)
    # -- breakdown
    if "tiny" in models:
        print("[mfu] breakdown", file=sys.stderr, flush=True)
        bd = breakdown(reps)
        whole = bd["whole PPO update on one minibatch (make_ppo_step, 1 epoch, batch 4)"]
        lines += ["", "### Where a tiny PPO minibatch update goes (rljax, ms, median)", "",
                  "| sub-program | ms | share of the whole update |", "|---|---:|---:|"]
        for k, v in bd.items():
            lines.append(f"| {k} | {v * 1e3:.1f} | {v / whole:.0%} |")

    flush(lines, args.out)
    # -- XLA flags A/B
    if args.ab_flags:
        print("[mfu] XLA flags A/B", file=sys.stderr, flush=True)
        ab = {k: [] for k in FLAG_SETS}
        for _ in range(args.ab_rounds):
            for k, flags in FLAG_SETS.items():
                env = dict(os.environ, XLA_FLAGS=flags)
                ab[k].append(sub([sys.executable, os.path.abspath(__file__), "--worker", "flags", "--threads",
                                  str(args.threads)], env=env))
                print(f"  {k}: {ab[k][-1]}", file=sys.stderr, flush=True)
        base = statistics.median(x["step"] for x in ab["default"])
        base_h = statistics.median(x["head"] for x in ab["default"])
        lines += ["", f"### XLA flags, tiny PPO one-minibatch update and head matmul ({args.ab_rounds} alternated "
                  "rounds, median)", "", "| XLA_FLAGS | update ms | vs default | head matmul ms | vs default |",
                  "|---|---:|---:|---:|---:|"]
        for k, flags in FLAG_SETS.items():
            st = statistics.median(x["step"] for x in ab[k])
            hd = statistics.median(x["head"] for x in ab[k])
            lines.append(f"| `{flags or '(none)'}` | {st * 1e3:.1f} | {base / st:.2f}x | {hd * 1e3:.1f} | "
                         f"{base_h / hd:.2f}x |")

    lines += ["", f"_{time.time() - t_start:.0f} s; load average (1 min) at end {os.getloadavg()[0]:.1f}._"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
