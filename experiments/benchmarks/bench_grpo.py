"""GRPO/RLOO vs PPO iteration time at equal tokens generated, and a vmapped sweep of 4 seeds
vs 4 sequential runs (rljax.sweep). Offline, random-init GPT-2; every algorithm runs its whole
loop as one compiled ``make_train``; times exclude compilation (one warm-up call each).

    python experiments/benchmarks/bench_grpo.py [--n_embd 128 --n_layer 4 --steps 10 --out RESULTS_grpo.json]

Prints the results as JSON and as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax import grpo, rloo
from rljax.generation import make_generate_fn
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.sweep import make_sweep, with_seeds

EOS, PAD = 2, 0


def timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def markdown_table(results: dict) -> str:
    """The results as a markdown table (what RESULTS files quote)."""
    c = results["config"]
    tokens = c["completions"] * c["new_tokens"]
    ppo = results["ppo_s_per_iter"]
    rows = [
        ("GRPO iteration", results["grpo_s_per_iter"], f"{results['grpo_s_per_iter'] / ppo:.2f}x PPO"),
        ("RLOO iteration", results["rloo_s_per_iter"], f"{results['rloo_s_per_iter'] / ppo:.2f}x PPO"),
        ("PPO iteration", ppo, "1.00x PPO"),
        (f"GRPO sweep, {c['seeds']} seeds vmapped", results["grpo_sweep_vmapped_s"],
         f"{results['grpo_sweep_sequential_s'] / results['grpo_sweep_vmapped_s']:.2f}x faster than sequential"),
        (f"GRPO sweep, {c['seeds']} seeds sequential", results["grpo_sweep_sequential_s"], ""),
    ]
    lines = [f"GPT-2 n_embd={c['n_embd']} n_layer={c['n_layer']} vocab={c['vocab']}, {c['completions']} completions x "
             f"{c['new_tokens']} tokens = {tokens} tokens generated per iteration (group {c['group']}), "
             f"{c['steps']} iterations per call, backend {results['backend']}, compilation excluded.", "",
             "| measurement | seconds | relative |", "|---|---:|---|"]
    lines += [f"| {name} | {sec:.4f} | {rel} |" for name, sec, rel in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--completions", type=int, default=64, help="completions per iteration (all algorithms)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lm = model_from_config(GPT2Config(vocab_size=a.vocab, n_positions=a.prompt_len + a.new_tokens, n_embd=a.n_embd,
                                      n_layer=a.n_layer, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      eos_token_id=EOS))
    params = init_params(lm, jax.random.PRNGKey(0))
    bank = np.random.RandomState(0).randint(3, a.vocab, (256, a.prompt_len)).astype(np.int32)
    mask = np.ones_like(bank)
    gen = make_generate_fn(lm, max_new_tokens=a.new_tokens, do_sample=True, pad_token_id=PAD, jit=False)

    def reward(c, m):
        return ((c % 7 == 0) * m).sum(-1).astype(jnp.float32)

    tx = optax.adam(1e-4)
    B, G = a.completions, a.group
    results = {"config": vars(a), "backend": jax.default_backend()}
    s = grpo.GRPOSettings(num_generations=G, generation_batch_size=B, max_completion_length=a.new_tokens, beta=0.04)
    g_train = jax.jit(grpo.make_train(lm, s, gen, lambda _, b: reward(b.completions, b.completion_mask), a.steps, tx))
    g_state = grpo.GRPOTrainState.create(params, tx, ref_params=params)
    results["grpo_s_per_iter"] = timed(g_train, g_state, None, bank, mask) / a.steps
    r = rloo.RLOOSettings(rloo_k=G, batch_size=B, num_ppo_epochs=4, num_mini_batches=4)
    r_train = jax.jit(rloo.make_train(lm, r, gen, lambda _, b: reward(b.completions, b.completion_mask), a.steps, tx))
    results["rloo_s_per_iter"] = timed(r_train, rloo.RLOOTrainState.create(params, tx, ref_params=params), None, bank,
                                       mask) / a.steps
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import PPOTrainState, make_train

    model = AutoModelForCausalLMWithValueHead.from_lm(lm, params, summary_dropout_prob=0.0)
    vgen = make_generate_fn(model.module, max_new_tokens=a.new_tokens, do_sample=True, pad_token_id=PAD, jit=False)
    config = PPOConfig(batch_size=B, mini_batch_size=B // 4, ppo_epochs=4)
    p_train = jax.jit(make_train(model.module, config, vgen, lambda _, ro: reward(ro.responses, ro.response_mask),
                                 a.steps))
    results["ppo_s_per_iter"] = timed(p_train, PPOTrainState.create(model.params, model.params, config), None, bank,
                                      mask) / a.steps
    # sweep: S seeds of GRPO in one vmapped program vs S sequential runs of the single program
    states = with_seeds(g_state, range(a.seeds))
    results["grpo_sweep_vmapped_s"] = timed(make_sweep(g_train), states, None, bank, mask)
    start = time.perf_counter()
    for i in range(a.seeds):
        jax.block_until_ready(g_train(g_state.replace(rng=jax.random.PRNGKey(i)), None, bank, mask))
    results["grpo_sweep_sequential_s"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    print(markdown_table(results))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
