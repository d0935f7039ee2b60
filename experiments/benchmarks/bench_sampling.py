"""Greedy vs sampled generation time: Gumbel (``jax.random.categorical``) vs inverse-CDF sampling.

Tiny GPT-2 (4 layers, d=256, vocab 50257), batch 16, prompt 16, +64 new tokens (bench_mfu.py's
shape). The three programs are timed in alternating rounds (A/B/C, same load); reports median
wall and process CPU seconds per ``generate`` call.

    python experiments/benchmarks/bench_sampling.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rljax.generation as gen
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config

VOCAB, EOS, B, P, N = 50257, 50256, 16, 16, 64


def gumbel_sample_logits(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """The previous sampler: Gumbel-max over every [B, V] entry."""
    filtered = gen.filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, bos_token_id=EOS, eos_token_id=EOS,
                     n_layer=4, n_embd=256, n_head=4)
    lm = model_from_config(cfg)
    params = init_params(lm, jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    q = rs.randint(0, EOS, (B, P)).astype(np.int32)
    qm = np.ones((B, P), np.int32)
    rng = jax.random.PRNGKey(0)
    kw = dict(max_new_tokens=N, min_new_tokens=N, eos_token_id=EOS, pad_token_id=EOS)

    limit = jnp.int32(N)
    new_sampler = gen.sample_logits
    progs = {}
    for name, sample, sampler in (("greedy", False, new_sampler), ("sampled, categorical (old)", True,
                                  gumbel_sample_logits), ("sampled, inverse CDF (new)", True, new_sampler)):
        gen.sample_logits = sampler  # looked up when ``choose`` is traced
        core = gen.make_generate_fn(lm, do_sample=sample, top_k=0, top_p=1.0, jit=False, **kw)
        progs[name] = jax.jit(core).lower(params, q, qm, rng, limit).compile()
        jax.block_until_ready(progs[name](params, q, qm, rng, limit))
    gen.sample_logits = new_sampler

    wall = {k: [] for k in progs}
    cpu = {k: [] for k in progs}
    for _ in range(args.rounds):
        for name, prog in progs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(prog(params, q, qm, rng, limit))
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    print(f"B={B} prompt={P} +{N} tokens, vocab {VOCAB}, {args.rounds} alternating rounds")
    for name in progs:
        print(f"{name:28s} wall {statistics.median(wall[name]):.3f} s  cpu {statistics.median(cpu[name]):.3f} s"
              f"  (cpu min {min(cpu[name]):.3f}, max {max(cpu[name]):.3f})")


if __name__ == "__main__":
    main()
