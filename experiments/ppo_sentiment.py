"""TRL's ``gpt2-sentiment`` PPO example through the TRL-style ``PPOTrainer`` shell.

    python experiments/ppo_sentiment.py                          # offline (tiny GPT-2, VADER reward)
    python experiments/ppo_sentiment.py --log_with tensorboard    # or wandb (WANDB_MODE=offline works)
    python experiments/ppo_sentiment.py --model_name_or_path gpt2 --dataset_name imdb   # the original, online

The loop is TRL's, line for line: queries are the first 2-4 tokens of a review
(``LengthSampler``), ``trainer.generate`` samples 4-11 new tokens, a sentiment scorer turns
query + response text into a score (a Python function on decoded text: the loop's only host
boundary), ``trainer.step`` runs PPO and ``trainer.log_stats`` adds ``env/reward_*``. Stats go
to ``output_dir/metrics.jsonl`` and stdout, plus TensorBoard / W&B with ``--log_with``, and a
``game_log`` table (query / response / reward) every ``--sample_every`` steps (``samples.md``).

Offline the scorer is VADER's compound sentiment (the ``vaderSentiment`` lexicon, in place of
the ``lvwerra/distilbert-imdb`` classifier) and the policy is the tiny GPT-2 SFT'd on
VADER-built reviews (``runs/sft``; trained first by experiments/sft.py when missing). Online,
``--model_name_or_path`` / ``--dataset_name`` run the quickstart's ``run_online`` (the
classifier's POSITIVE logit as reward), unchanged.

For a reward that is a JAX function (a reward model), the whole loop compiles into one
``lax.scan`` instead: ``rljax ppo --reward_model DIR`` or ``rljax.ppo_train.make_train``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Literal, Optional, Sequence

import numpy as np

from _offline import offline_assets, sft_checkpoint


@dataclasses.dataclass
class Args:
    """ppo_sentiment options (PPO hyper-parameters follow TRL's example, scaled to the tiny model offline)."""

    output_dir: str = "runs/ppo_sentiment"
    ppo_steps: int = 30
    """PPO steps (batches of batch_size queries); offline, 30 take ~3 min on 2 CPU cores (VADER ~0.15 -> ~0.6)."""
    batch_size: int = 32
    mini_batch_size: int = 8
    learning_rate: float = 3e-4
    """Offline default; TRL's example uses 1.41e-5 with GPT-2 (used online)."""
    init_kl_coef: float = 0.1
    log_with: Optional[Literal["wandb", "tensorboard", "jsonl"]] = None
    """Extra tracker besides stdout + metrics.jsonl."""
    sample_every: int = 5
    """Log a game_log table every N steps."""
    seed: int = 0
    model_name_or_path: Optional[str] = None
    """Online: HF causal LM (e.g. gpt2); needs --dataset_name."""
    dataset_name: Optional[str] = None
    """Online: dataset with a 'text' column (e.g. imdb)."""
    reward_model: str = "lvwerra/distilbert-imdb"
    """Online: sentiment classifier used as the reward."""
    fast: bool = False
    """Online: TRL's batch 128 -> 32 (quicker)."""


def run_offline(args: Args) -> dict:
    from transformers import AutoTokenizer

    import datasets
    from quickstart import sentiment_judge
    from rljax.core import LengthSampler
    from rljax.logging import MetricLogger
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    assets = offline_assets()
    policy_dir = sft_checkpoint()
    config = PPOConfig(
        model_name=policy_dir, query_dataset=assets["reviews"], reward_model="vader", learning_rate=args.learning_rate,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, init_kl_coef=args.init_kl_coef,
        log_with=args.log_with, seed=args.seed, steps=args.ppo_steps * args.batch_size,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    # build_dataset, as in TRL's example: each query is the first 2-4 tokens of a review.
    with open(assets["reviews"]) as f:
        reviews = [json.loads(line)["text"].replace(tokenizer.eos_token, "") for line in f]
    input_size = LengthSampler(2, 5, rng=args.seed)
    ds = datasets.Dataset.from_dict({"review": reviews})
    ds = ds.map(lambda x: {"input_ids": tokenizer.encode(x["review"])[: input_size()]})
    ds = ds.map(lambda x: {"query": tokenizer.decode(x["input_ids"])})

    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, summary_dropout_prob=0.0)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=ds.select_columns(["input_ids", "query"]))
    judge = sentiment_judge()  # offline stand-in for pipeline("sentiment-analysis", ...)
    output_length = LengthSampler(4, 12, rng=args.seed + 1)
    gen_kwargs = dict(min_length=-1, top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    os.makedirs(args.output_dir, exist_ok=True)
    logger = MetricLogger(
        ["stdout", "jsonl"] + ([args.log_with] if args.log_with not in (None, "jsonl") else []), args.output_dir,
        config=config.to_dict(), project_name=config.tracker_project_name, tracker_kwargs=config.tracker_kwargs,
        sample_every=args.sample_every, stdout_keys=("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total"),
    )
    rewards_per_step, t0, step = [], time.time(), 0
    with logger:
        while step < args.ppo_steps:  # epochs over the queries until ppo_steps batches are done
            for batch in trainer.dataloader:
                if step >= args.ppo_steps:
                    break
                queries = [np.asarray(q) for q in batch["input_ids"]]
                # One length per batch (batch_size=...): TRL samples one per chunk of 4; fewer compiled shapes here.
                # max_new_tokens is overridden by length_sampler; PPOTrainer.generate currently insists on it.
                responses = trainer.generate(queries, return_prompt=False, length_sampler=output_length,
                                             batch_size=config.batch_size, max_new_tokens=11, **gen_kwargs)
                batch["response"] = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
                texts = [q + r for q, r in zip(batch["query"], batch["response"])]
                scores = [judge(t) for t in texts]
                stats = trainer.step(queries, responses, scores)
                logs = trainer.log_stats(stats, batch, scores)
                step += 1
                logger.log(logs, step)
                logger.log_samples({"query": batch["query"], "response": batch["response"], "reward": scores}, step)
                rewards_per_step.append(logs["env/reward_mean"])
    k = max(1, len(rewards_per_step) // 4)
    summary = {
        "ppo/reward_before": float(np.mean(rewards_per_step[:k])), "ppo/reward_after": float(np.mean(rewards_per_step[-k:])),
        "ppo/kl": float(stats["objective/kl"]), "ppo/steps": len(rewards_per_step), "ppo/seconds": time.time() - t0,
    }
    trainer.save_pretrained(os.path.join(args.output_dir, "ppo_policy"), overwrite=True)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"VADER reward (mean of first / last quarter of the steps): {summary['ppo/reward_before']:.3f} -> "
          f"{summary['ppo/reward_after']:.3f}; wrote {args.output_dir}/ (metrics.jsonl, samples.md, ppo_policy/)")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import tyro

    args = tyro.cli(Args, args=argv, use_underscores=True)
    if (args.model_name_or_path is None) != (args.dataset_name is None):
        raise SystemExit("--model_name_or_path and --dataset_name go together (the online TRL example).")
    if args.model_name_or_path is not None:
        import quickstart

        return quickstart.run_online(quickstart.Args(
            output_dir=args.output_dir, seed=args.seed, model_name_or_path=args.model_name_or_path,
            dataset_name=args.dataset_name, reward_model=args.reward_model, ppo_steps=args.ppo_steps, fast=args.fast,
        ))
    return run_offline(args)


if __name__ == "__main__":
    main()
