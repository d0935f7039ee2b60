"""rljax vs transformers (PyTorch) on CPU: a forward pass and greedy cached generation.

Not a test. Both frameworks run in this process on the same random weights
(built with transformers, saved as safetensors, loaded by rljax) and the same
number of CPU threads. Cases:

  forward   GPT-2-small shape (124M: d=768, 12 layers, 12 heads, vocab 50257), batch 8 x 128
  generate  64 new tokens, batch 8, prompt 16, greedy with KV cache, for a 4-layer
            d=256 GPT-2 and the GPT-2-small shape
  Pythia-160M shape (GPT-NeoX: d=768, 12 layers, 12 heads, rotary_pct 0.25, parallel
            residual, vocab 50304): forward batch 8 x 128 and the same generation

Reported: median wall time of steady-state calls, the ratio PyTorch / rljax (>1
means rljax is faster) and rljax's one-off cost to trace + compile (measured ahead of time with
``jit(...).lower(...).compile()``). The machine's load average is printed: on a
shared machine, oversubscribed CPUs slow both frameworks, and not equally: with
2 threads on 2 busy cores PyTorch's thread pool was 5-7x slower than with 1
thread (2026-11-25), so prefer ``--threads 1`` on a loaded machine. Usage:

  python experiments/benchmarks/bench_models.py [--quick] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

from _report import emit


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (3 forward / 2 generate instead of 10 / 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks (default 2)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    return p.parse_args()


def pin_threads(n: int) -> None:
    """Restrict the process to n CPUs before jax/torch start their thread pools
    (XLA sizes its pool from the schedulable CPUs; torch is set explicitly)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:n])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def timed(fn, reps: int):
    """(first call seconds, median of `reps` later calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def compile_time(jitted, *args) -> float:
    """Seconds to trace, lower and compile ``jitted`` for these arguments (ahead of time)."""
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def build(hf_config, tmp: str, name: str, hf_class: str = "GPT2LMHeadModel"):
    """A random HF causal LM (``hf_class``) and the same weights loaded by rljax."""
    import torch
    import transformers

    from rljax.models import from_pretrained

    torch.manual_seed(0)
    hf = getattr(transformers, hf_class)(hf_config).eval()
    path = os.path.join(tmp, name)
    hf.save_pretrained(path)
    model, params = from_pretrained(path)
    return hf, model, params


def bench_forward(hf, model, params, batch, seq, reps):
    import jax
    import numpy as np
    import torch

    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m).logits)
    j_ids, j_mask = jax.numpy.asarray(ids), jax.numpy.asarray(mask)
    compile_s = compile_time(apply, params, j_ids, j_mask)
    _, j_med = timed(lambda: apply(params, j_ids, j_mask).block_until_ready(), reps)
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def torch_fwd():
        with torch.inference_mode():
            return hf(t_ids, attention_mask=t_mask).logits

    _, t_med = timed(torch_fwd, reps)
    diff = float(np.max(np.abs(np.asarray(apply(params, j_ids, j_mask)) - torch_fwd().numpy())))
    return dict(rljax=j_med, torch=t_med, compile=compile_s, check=f"max |dlogits| {diff:.1e}")


def bench_generate(hf, model, params, batch, prompt_len, new_tokens, reps):
    import jax
    import numpy as np
    import torch

    from rljax.generation import make_generate_fn

    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    fn = make_generate_fn(model, max_new_tokens=new_tokens, do_sample=False)
    j_ids, j_mask, rng = jax.numpy.asarray(ids), jax.numpy.asarray(mask), jax.random.PRNGKey(0)
    compile_s = compile_time(fn, params, j_ids, j_mask, rng)
    _, j_med = timed(lambda: fn(params, j_ids, j_mask, rng).sequences.block_until_ready(), reps)
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def torch_gen():
        with torch.inference_mode():
            return hf.generate(
                t_ids, attention_mask=t_mask, do_sample=False, use_cache=True, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
            )

    _, t_med = timed(torch_gen, reps)
    ours = np.asarray(fn(params, j_ids, j_mask, rng).sequences)
    theirs = torch_gen().numpy()
    same = ours.shape == theirs.shape and float(np.mean(ours == theirs))
    return dict(rljax=j_med, torch=t_med, compile=compile_s, check=f"tokens equal {same:.0%}")


def main():
    args = parse_args()
    pin_threads(args.threads)
    import jax
    import torch
    import transformers

    import flax

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    fwd_reps, gen_reps = (3, 2) if args.quick else (10, 5)
    new_tokens = 64

    small = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
    tiny = dict(n_embd=256, n_layer=4, n_head=4, vocab_size=50257, n_positions=1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in (("d256 x 4 layers", tiny), ("GPT-2 small (124M)", small)):
            cfg = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None)
            hf, model, params = build(cfg, tmp, name.split()[0])
            if shape is small:
                print(f"forward {name} ...", file=sys.stderr, flush=True)
                r = bench_forward(hf, model, params, 8, 128, fwd_reps)
                rows.append((f"forward, {name}", "batch 8 x 128", r))
            print(f"generate {name} ...", file=sys.stderr, flush=True)
            r = bench_generate(hf, model, params, 8, 16, new_tokens, gen_reps)
            rows.append((f"greedy generate, {name}", f"batch 8, prompt 16, +{new_tokens} tokens", r))
            del hf, model, params
        name = "Pythia-160M shape"
        cfg = transformers.GPTNeoXConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        )
        hf, model, params = build(cfg, tmp, "pythia", "GPTNeoXForCausalLM")
        print(f"forward {name} ...", file=sys.stderr, flush=True)
        rows.append((f"forward, {name}", "batch 8 x 128", bench_forward(hf, model, params, 8, 128, fwd_reps)))
        print(f"generate {name} ...", file=sys.stderr, flush=True)
        r = bench_generate(hf, model, params, 8, 16, new_tokens, gen_reps)
        rows.append((f"greedy generate, {name}", f"batch 8, prompt 16, +{new_tokens} tokens", r))
        del hf, model, params

    header = (
        f"Date {datetime.date.today()}; {platform.machine()} CPU, {args.threads} threads for both "
        f"(torch.set_num_threads, process CPU affinity); jax {jax.__version__}, flax {flax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; float32; "
        f"median of {fwd_reps} (forward) / {gen_reps} (generate) calls after one warm-up call; "
        f"load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}."
    )
    lines = [
        header,
        "",
        "| case | shape | rljax (s) | PyTorch (s) | PyTorch / rljax | rljax jit compile (s) | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, shape, r in rows:
        lines.append(
            f"| {case} | {shape} | {r['rljax']:.3f} | {r['torch']:.3f} | {r['torch'] / r['rljax']:.2f}x "
            f"| {r['compile']:.1f} | {r['check']} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
