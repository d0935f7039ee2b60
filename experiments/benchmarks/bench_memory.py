"""Memory and compile time of the PPO step for real model sizes (CPU; only compiles). Not a test.

    python experiments/benchmarks/bench_memory.py [--models gpt2-small,llama-1b] [--batch 64]
        [--depths 2,4,8,16,24] [--depth_width 256] [--quick]

Prints two markdown tables:

1. Peak bytes of the compiled PPO step (``make_ppo_step``: ppo_epochs x minibatches of
   policy+value forward/backward and the Adam update) for a GPT-2-small-shaped and a
   Llama-1B-shaped (Llama 3.2 1B: 16 layers, d=2048, GQA 32/8, vocab 128256, tied) value-head
   model at ``--batch`` rows, with the layer loop plain or scanned and per-block remat off,
   "full" or "dots": XLA's ``memory_analysis()`` (temporaries, arguments, outputs) of the
   program lowered on ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: no parameter is ever
   allocated), and the compile seconds.
2. Compile seconds of the same PPO step vs depth (``--depths``) at width ``--depth_width``,
   plain vs scanned layers, and the HLO text size.

``--quick`` shrinks everything (vocab 512, 2-4 layers, batch 8) to check the script runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rljax.models.attention import with_layer_options  # noqa: E402
from rljax.models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from rljax.models.heads import CausalLMWithValueHead  # noqa: E402
from rljax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from rljax.ppo import PPOConfig  # noqa: E402
from rljax.ppo_train import PPOTrainState, make_ppo_step  # noqa: E402
from rljax.rollout import make_forward_rollout  # noqa: E402

GiB = 2**30
SETUPS = [(False, "none"), (False, "full"), (True, "none"), (True, "full"), (True, "dots")]


def gpt2_small(layers: int = 12, width: int = 768, vocab: int = 50257) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=max(1, width // 64)))


def llama_1b(layers: int = 16, width: int = 2048, vocab: int = 128256) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 256), tie_word_embeddings=True,
        max_position_embeddings=2048, rope_theta=500000.0))


def lower_ppo_step(lm, batch: int, query_len: int, response_len: int, mini_batch: int):
    """The jitted PPO step of ``lm`` + value head, lowered on abstract state and rollout."""
    module = CausalLMWithValueHead(lm, summary_dropout_prob=0.0)
    config = PPOConfig(batch_size=batch, mini_batch_size=mini_batch, gradient_accumulation_steps=1, ppo_epochs=1)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids)["params"])
    state = jax.eval_shape(lambda p: PPOTrainState.create(p, p, config), params)
    tok = lambda n: jax.ShapeDtypeStruct((batch, n), jnp.int32)  # noqa: E731
    forward = make_forward_rollout(module, chunk_size=mini_batch)
    rollout = jax.eval_shape(forward, params, params, tok(query_len), tok(query_len), tok(response_len),
                             tok(response_len))
    scores = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return jax.jit(make_ppo_step(module, config)).lower(state, rollout, scores)


def compile_timed(lowered):
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def memory_table(models, batch, query_len, response_len, mini_batch):
    print(f"\n| model | layers | remat | temp GiB | args GiB | out GiB | compile s |  (batch {batch}, "
          f"{query_len}+{response_len} tokens, minibatch {mini_batch})")
    print("|---|---|---|---|---|---|---|")
    for name, lm in models:
        for scan, policy in SETUPS:
            variant = with_layer_options(lm, remat_policy=policy, scan_layers=scan)
            compiled, secs = compile_timed(lower_ppo_step(variant, batch, query_len, response_len, mini_batch))
            m = compiled.memory_analysis()
            print(f"| {name} | {'scanned' if scan else 'loop'} | {policy} | {m.temp_size_in_bytes / GiB:.3f} | "
                  f"{m.argument_size_in_bytes / GiB:.3f} | {m.output_size_in_bytes / GiB:.3f} | {secs:.1f} |",
                  flush=True)


def depth_table(depths, width, vocab, batch, query_len, response_len, mini_batch):
    print(f"\n| layers | loop compile s | scanned compile s | loop HLO kB | scanned HLO kB |  "
          f"(GPT-2 shape d={width}, vocab {vocab}, PPO step, batch {batch})")
    print("|---|---|---|---|---|")
    for layers in depths:
        row = []
        for scan in (False, True):
            lm = with_layer_options(gpt2_small(layers, width, vocab), scan_layers=scan)
            lowered = lower_ppo_step(lm, batch, query_len, response_len, mini_batch)
            _, secs = compile_timed(lowered)
            row.append((secs, len(lowered.as_text()) / 1e3))
        print(f"| {layers} | {row[0][0]:.1f} | {row[1][0]:.1f} | {row[0][1]:.0f} | {row[1][1]:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2-small,llama-1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mini_batch", type=int, default=8)
    ap.add_argument("--query_len", type=int, default=64)
    ap.add_argument("--response_len", type=int, default=64)
    ap.add_argument("--depths", default="2,4,8,16,24")
    ap.add_argument("--depth_width", type=int, default=256)
    ap.add_argument("--skip_memory", action="store_true")
    ap.add_argument("--skip_depth", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: check that the script runs")
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if a.quick:
        builders = {"gpt2-small": lambda: gpt2_small(2, 64, 512), "llama-1b": lambda: llama_1b(2, 128, 512)}
        a.batch, a.mini_batch, a.query_len, a.response_len, a.depths, a.depth_width = 8, 4, 8, 8, "2,4", 64
    else:
        builders = {"gpt2-small": gpt2_small, "llama-1b": llama_1b}
    if not a.skip_memory:
        models = [(name, builders[name]()) for name in a.models.split(",") if name]
        memory_table(models, a.batch, a.query_len, a.response_len, a.mini_batch)
    if not a.skip_depth:
        depths = [int(d) for d in a.depths.split(",")]
        vocab = 512 if a.quick else 50257
        depth_table(depths, a.depth_width, vocab, a.batch, a.query_len, a.response_len, a.mini_batch)


if __name__ == "__main__":
    main()
