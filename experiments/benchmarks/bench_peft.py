"""PEFT memory and speed: the PPO train state for full fine-tuning vs LoRA vs QLoRA, and a
LoRA PPO step vs a full one. Not a test.

Memory (``jax.eval_shape`` only: nothing is materialised, so 1B shapes cost nothing):
the PPO train state = policy params (+ value head) + reference params + Adam moments.

  full   float32 policy, a float32 reference copy, Adam over everything (TRL without peft)
  lora   float32 base + adapters (r=16, alpha=16, PEFT's default targets), NO reference
         (adapters off = the reference), Adam over adapters + value head
  qlora  as lora with the base's linear kernels in NF4 (int8 also listed)

Shapes: GPT-2-small (124M, c_attn adapted) and a Llama-3.2-1B-shaped model (hidden 2048,
16 layers, 32/8 heads, intermediate 8192, vocab 128256, tied; q_proj/v_proj adapted).

Speed: ``PPOTrainer.step`` seconds (median after warm-up) on a small GPT-2 (4 layers, d=256,
vocab 2048), batch 16, 24-token queries, 24-token responses, ppo_epochs=4, minibatch 4,
full vs LoRA. On CPU.

  python experiments/benchmarks/bench_peft.py [--iters 3] [--skip-speed]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

from rljax.models.gpt2 import GPT2Config
from rljax.models.heads import CausalLMWithValueHead, init_value_head
from rljax.models.hub import abstract_params, init_params, model_from_config
from rljax.models.llama import LlamaConfig
from rljax.models.peft import LoraConfig, inject_adapters, trainable_mask
from rljax.models.quant import param_bytes, quantize_params

SHAPES = {
    "GPT-2-small": GPT2Config(),
    "Llama-1B": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                            max_position_embeddings=2048),
}


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def state_bytes(config) -> dict:
    """Bytes of policy / reference / Adam for full, lora, qlora_int8, qlora_nf4."""
    lm = model_from_config(config)
    module = CausalLMWithValueHead(lm)
    base = jax.eval_shape(lambda: {**abstract_params(lm), **init_value_head(module, jax.random.PRNGKey(0))})
    adam = optax.adam(1e-5)
    out = {"full": dict(policy=param_bytes(base), reference=param_bytes(base),
                        adam=param_bytes(jax.eval_shape(adam.init, base)))}
    lora_cfg = LoraConfig(r=16, lora_alpha=16)

    def with_lora(quant):
        def build(p):
            p = p if quant is None else quantize_params(p, quant)
            return inject_adapters(p, lora_cfg, config.model_type, jax.random.PRNGKey(0))

        params = jax.eval_shape(build, base)
        mask = trainable_mask(params, lora_cfg)
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
        tx = optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)
        return dict(policy=param_bytes(params), reference=0, adam=param_bytes(jax.eval_shape(tx.init, params)))

    out["lora"] = with_lora(None)
    out["qlora_int8"] = with_lora("int8")
    out["qlora_nf4"] = with_lora("nf4")
    return out


def ppo_speed(iters: int) -> dict:
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.models.peft import get_peft_model
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    lm = model_from_config(GPT2Config(vocab_size=2048, n_positions=128, n_embd=256, n_layer=4, n_head=4))
    params = init_params(lm, jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    B, L = 16, 24
    queries = [rs.randint(3, 2048, L) for _ in range(B)]
    responses = [rs.randint(3, 2048, L) for _ in range(B)]
    scores = [np.float32(s) for s in rs.randn(B)]
    out = {}
    for name in ("full", "lora"):
        model = AutoModelForCausalLMWithValueHead.from_lm(lm, params)
        if name == "lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16))
        trainer = PPOTrainer(PPOConfig(batch_size=B, mini_batch_size=4, ppo_epochs=4), model, ref_model=None)
        times = []
        for i in range(iters + 1):
            t0 = time.perf_counter()
            stats = trainer.step(queries, responses, scores)
            jax.block_until_ready(stats["ppo/loss/total"])
            times.append(time.perf_counter() - t0)
        out[name] = dict(first=times[0], median=statistics.median(times[1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    print("| model | setup | policy GiB | reference GiB | Adam GiB | total GiB |")
    print("|---|---|---|---|---|---|")
    for shape, cfg in SHAPES.items():
        for setup, b in state_bytes(cfg).items():
            total = b["policy"] + b["reference"] + b["adam"]
            print(f"| {shape} | {setup} | {_gb(b['policy'])} | {_gb(b['reference'])} | {_gb(b['adam'])} | {_gb(total)} |")
    if not a.skip_speed:
        speed = ppo_speed(a.iters)
        print("\n| PPO step (GPT-2 4x256, B=16, 24+24 tokens, 4 epochs x 4 minibatches) | first call s | steady s |")
        print("|---|---|---|")
        for name, s in speed.items():
            print(f"| {name} | {s['first']:.2f} | {s['median']:.3f} |")


if __name__ == "__main__":
    main()
