"""GRPO, RLOO and PPO teach a tiny model single-digit addition, offline on CPU.

1. Token-level "a+b=" prompts (a character vocabulary: pad, bos, eos, 0-9, +, =). The 100 sums
   are split by unordered pair {a, b} (a sum and its mirror b+a on the same side) into RL-train
   sums and ``unseen`` sums (in neither SFT nor RL).
2. SFT: a 2-layer GPT-2 learns the answer format (digits then eos) on a FEW of the train sums
   only. The other train sums are "held out" from supervision: their answers are never shown;
   the RL phase sees only their prompts and a 0/1 reward. Greedy accuracy there starts near
   chance.
3. From that same checkpoint, the same budget of sampled completions per iteration for each
   algorithm: GRPO (``rljax.grpo.make_train``), RLOO (``rljax.rloo.make_train``) and PPO
   (``rljax.ppo_train.make_train``, with a value head), each one ``lax.scan`` over the whole run,
   reward = exact match of the completion with the answer (a JAX function of the tokens).
4. ``summary.json`` in ``--output_dir``: ``{algo}/accuracy_before`` and ``{algo}/accuracy_after``
   (greedy exact match on the held-out sums: no answer shown in SFT, learned from the reward
   only), ``{algo}/unseen_accuracy_after`` (sums never prompted at all: a tiny model memorises
   facts rather than learning addition, so this one stays near chance), ``{algo}/seconds``; a
   table on stdout; ``reward_curve.png`` (mean reward per iteration, all three).

    python experiments/grpo_arithmetic.py --output_dir runs/grpo_arithmetic           # a few minutes
    python experiments/grpo_arithmetic.py --output_dir /tmp/ga --fast                 # CI
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax import grpo, rloo
from rljax.generation import make_generate_fn
from rljax.losses import sft_loss
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 13, 14
DIGIT0 = 3  # tokens 3..12 are the digits 0..9
VOCAB = 16
ANSWER_LEN = 3  # up to two digits and eos
ALGOS = ("grpo", "rloo", "ppo")


def digits(n: int):
    return [DIGIT0 + int(c) for c in str(n)]


def split_pairs(seed: int, n_heldout_pairs: int) -> Tuple[np.ndarray, np.ndarray]:
    """All (a, b) with 0 <= a, b <= 9, split by unordered pair {a, b}: [n, 2] train, held-out."""
    rng = np.random.RandomState(seed)
    unordered = [(a, b) for a in range(10) for b in range(a, 10)]
    rng.shuffle(unordered)
    held = unordered[:n_heldout_pairs]
    expand = lambda pairs: np.array(sorted({(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}))  # noqa: E731
    return expand(unordered[n_heldout_pairs:]), expand(held)


def prompts_of(pairs: np.ndarray) -> np.ndarray:
    """[n, 5] int32: bos a + b =."""
    return np.array([[BOS, DIGIT0 + a, PLUS, DIGIT0 + b, EQUALS] for a, b in pairs], np.int32)


def expected_completions(prompts: jax.Array) -> jax.Array:
    """[B, ANSWER_LEN] tokens of the right answer (digits, eos, pad) from the prompt tokens."""
    s = (prompts[:, 1] - DIGIT0) + (prompts[:, 3] - DIGIT0)
    one = jnp.stack([DIGIT0 + s, jnp.full_like(s, EOS), jnp.full_like(s, PAD)], axis=1)
    two = jnp.stack([jnp.full_like(s, DIGIT0 + 1), DIGIT0 + s - 10, jnp.full_like(s, EOS)], axis=1)
    return jnp.where((s < 10)[:, None], one, two).astype(jnp.int32)


def exact_match(prompts: jax.Array, completions: jax.Array) -> jax.Array:
    """[B] float32: 1 where the completion is exactly the answer then eos."""
    return jnp.all(completions == expected_completions(prompts), axis=1).astype(jnp.float32)


def build_model(seed: int):
    lm = model_from_config(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS,
                                      eos_token_id=EOS))
    return lm, init_params(lm, jax.random.PRNGKey(seed))


def sft(lm, params, pairs: np.ndarray, steps: int, lr: float):
    """Full-batch next-token training on ``bos a + b = answer eos`` (loss on the answer only)."""
    seqs, labels = [], []
    for a, b in pairs:
        ans = digits(a + b) + [EOS]
        seq = [BOS, DIGIT0 + a, PLUS, DIGIT0 + b, EQUALS] + ans + [PAD] * (ANSWER_LEN - len(ans))
        seqs.append(seq)
        labels.append([-100] * 5 + ans + [-100] * (ANSWER_LEN - len(ans)))
    ids, labels = jnp.asarray(seqs, jnp.int32), jnp.asarray(labels, jnp.int32)
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return sft_loss(lm.apply({"params": p}, ids, attention_mask=(ids != PAD) | (labels != -100)).logits,
                            labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    return params, float(loss)


EVAL_ROWS = 100  # every a+b: each evaluation set is padded to this many rows, so one compiled program


_GREEDY: Dict[int, object] = {}  # id(module) -> its jitted greedy generate (one trace per module)


def greedy_accuracy(module, params, prompts: np.ndarray) -> float:
    """Greedy exact-match accuracy on ``prompts`` [n <= 100, 5] (rows padded by repetition to
    ``EVAL_ROWS``, so every evaluation set shares one compiled generate)."""
    n = len(prompts)
    padded = np.concatenate([prompts, np.repeat(prompts[:1], EVAL_ROWS - n, axis=0)]) if n < EVAL_ROWS else prompts
    if id(module) not in _GREEDY:
        _GREEDY[id(module)] = make_generate_fn(module, max_new_tokens=ANSWER_LEN, do_sample=False, eos_token_id=EOS,
                                               pad_token_id=PAD)
    gen = _GREEDY[id(module)]
    out = gen(params, jnp.asarray(padded), jnp.ones(padded.shape, jnp.int32), jax.random.PRNGKey(0))
    hits = exact_match(jnp.asarray(padded), out.sequences[:, padded.shape[1]:])
    return float(hits[:n].mean())


def run_algo(name: str, lm, params, prompts: np.ndarray, args) -> Tuple[Dict, np.ndarray, object, object]:
    """Train ``name`` from ``params``; returns (timing, reward curve [steps], module, final params)."""
    B, G = args.prompts_per_step * args.samples_per_prompt, args.samples_per_prompt
    mask = np.ones_like(prompts)
    gen = make_generate_fn(lm, max_new_tokens=ANSWER_LEN, do_sample=True, temperature=1.0, eos_token_id=EOS,
                           pad_token_id=PAD, jit=False)
    tx = optax.adam(args.learning_rate)
    if name == "grpo":
        s = grpo.GRPOSettings(num_generations=G, generation_batch_size=B, max_completion_length=ANSWER_LEN,
                              beta=args.beta, loss_type="grpo")
        train = grpo.make_train(lm, s, gen, lambda _, b: exact_match(b.prompts, b.completions), args.steps, tx,
                                eos_token_id=EOS)
        state, key, module = grpo.GRPOTrainState.create(params, tx, ref_params=params,
                                                        rng=jax.random.PRNGKey(args.seed)), "reward", lm
    elif name == "rloo":
        s = rloo.RLOOSettings(rloo_k=G, batch_size=B, kl_coef=args.beta, num_ppo_epochs=1, num_mini_batches=1)
        train = rloo.make_train(lm, s, gen, lambda _, b: exact_match(b.prompts, b.completions), args.steps, tx,
                                eos_token_id=EOS)
        state, key, module = rloo.RLOOTrainState.create(params, tx, ref_params=params,
                                                        rng=jax.random.PRNGKey(args.seed)), "objective/scores", lm
    else:
        from rljax.models.heads import AutoModelForCausalLMWithValueHead
        from rljax.ppo import PPOConfig
        from rljax.ppo_train import PPOTrainState, make_train

        model = AutoModelForCausalLMWithValueHead.from_lm(lm, params, summary_dropout_prob=0.0)
        module = model.module
        vgen = make_generate_fn(module, max_new_tokens=ANSWER_LEN, do_sample=True, eos_token_id=EOS,
                                pad_token_id=PAD, jit=False)
        config = PPOConfig(batch_size=B, mini_batch_size=B // 4, ppo_epochs=1, learning_rate=args.learning_rate,
                           init_kl_coef=max(args.beta, 1e-3), adap_kl_ctrl=False, seed=args.seed)
        train = make_train(module, config, vgen, lambda _, r: exact_match(r.queries, r.responses), args.steps)
        # PPO samples batch_size prompts per iteration; repeat the bank G times so an epoch of
        # draws matches the others' prompts x samples (same completions per iteration).
        prompts, mask = np.repeat(prompts, G, axis=0), np.repeat(mask, G, axis=0)
        state, key = PPOTrainState.create(model.params, model.params, config), "env/reward_mean"
    start = time.time()
    final, stats = jax.jit(train)(state, None, prompts, mask)
    curve = np.asarray(stats[key])
    if module is not lm:  # PPO: evaluate the policy's LM params with the plain LM (the same greedy program)
        from rljax.models.heads import lm_params

        return {"seconds": time.time() - start}, curve, lm, lm_params(final.params)
    return {"seconds": time.time() - start}, curve, module, final.params


def main(argv=None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="runs/grpo_arithmetic")
    p.add_argument("--fast", action="store_true", help="CI size: fewer RL iterations")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--steps", type=int, default=None, help="RL iterations (default 600; --fast 80)")
    p.add_argument("--sft_pairs", type=int, default=14, help="train sums seen in SFT")
    p.add_argument("--sft_steps", type=int, default=60, help="full-batch SFT steps (few: a broad policy explores)")
    p.add_argument("--heldout_pairs", type=int, default=12, help="unordered {a, b} pairs never prompted (unseen)")
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.0, help="GRPO beta / RLOO kl_coef / PPO init_kl_coef")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (80 if args.fast else 600)
    os.makedirs(args.output_dir, exist_ok=True)

    train_pairs, unseen_pairs = split_pairs(args.seed, args.heldout_pairs)
    order = np.random.RandomState(args.seed + 1).permutation(len(train_pairs))
    sft_pairs, held_pairs = train_pairs[order[: args.sft_pairs]], train_pairs[order[args.sft_pairs:]]
    lm, params = build_model(args.seed)
    t0 = time.time()
    params, sft_final_loss = sft(lm, params, sft_pairs, args.sft_steps, 3e-3)
    train_prompts, held_prompts = prompts_of(train_pairs), prompts_of(held_pairs)
    unseen_prompts = prompts_of(unseen_pairs)
    before = greedy_accuracy(lm, params, held_prompts)
    before_unseen = greedy_accuracy(lm, params, unseen_prompts)
    summary = {"sft/final_loss": sft_final_loss, "sft/seconds": time.time() - t0, "sft/sft_sums": len(sft_pairs),
               "heldout_sums": len(held_pairs), "unseen_sums": len(unseen_pairs),
               "sft/accuracy_on_sft_sums": greedy_accuracy(lm, params, prompts_of(sft_pairs))}
    curves = {}
    for name in [a for a in args.algos.split(",") if a]:
        if name not in ALGOS:
            raise ValueError(f"--algos: unknown algorithm {name!r}; choose from {ALGOS}.")
        timing, curve, module, final = run_algo(name, lm, params, train_prompts, args)
        curves[name] = curve
        summary.update({f"{name}/accuracy_before": before, f"{name}/unseen_accuracy_before": before_unseen,
                        f"{name}/accuracy_after": greedy_accuracy(module, final, held_prompts),
                        f"{name}/unseen_accuracy_after": greedy_accuracy(module, final, unseen_prompts),
                        f"{name}/reward_first": float(curve[: max(1, len(curve) // 5)].mean()),
                        f"{name}/reward_last": float(curve[-max(1, len(curve) // 5):].mean()),
                        f"{name}/seconds": timing["seconds"]})
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    from rljax.sweep import plot_curves

    window = max(1, args.steps // 30)  # running mean: GRPO/RLOO see only 8 prompts per iteration
    smooth = {k.upper(): np.convolve(v, np.ones(window) / window, mode="valid")[None] for k, v in curves.items()}
    plot_curves(smooth, os.path.join(args.output_dir, "reward_curve.png"),
                title=f"exact-match reward on a+b (train sums), running mean of {window}", ylabel="mean reward")
    print(f"{'algo':6} {'held-out before':>16} {'held-out after':>15} {'unseen after':>13} {'seconds':>8}")
    for name in curves:
        print(f"{name:6} {summary[name + '/accuracy_before']:16.3f} {summary[name + '/accuracy_after']:15.3f} "
              f"{summary[name + '/unseen_accuracy_after']:13.3f} {summary[name + '/seconds']:8.1f}")
    return summary


if __name__ == "__main__":
    main()
