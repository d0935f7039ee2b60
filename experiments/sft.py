"""Supervised fine-tuning, TRL's ``examples/scripts/sft.py`` the rljax way: a thin wrapper over
``rljax sft`` (every SFTConfig / TrainingArguments field is a flag; see ``rljax sft --help``).

    python experiments/sft.py                       # offline: a tiny GPT-2 learns VADER-built reviews
    python experiments/sft.py --max_steps 20        # any `rljax sft` flag overrides the defaults
    python experiments/sft.py --model_name_or_path gpt2 --dataset_name imdb   # with internet (or local paths)

Offline, the tiny GPT-2, its tokenizer and the reviews come from ``experiments/_offline.py``
(the quickstart's data builders) and training takes about a minute on 2 CPU cores; the model is
written to ``runs/sft`` (what reward_modeling.py, dpo.py and ppo_sentiment.py start from).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from _offline import has_flag, offline_assets

OFFLINE_DEFAULTS = dict(
    output_dir="runs/sft", overwrite_output_dir=True, learning_rate=3e-3, per_device_train_batch_size=32, max_steps=150,
    warmup_steps=10, logging_steps=25, max_seq_length=32, save_strategy="no", dataset_text_field="text",
    dataset_test_split="test",
)
# TRL's example defaults (facebook/opt-350m on openassistant-guanaco) for an online run.
ONLINE_DEFAULTS = dict(
    output_dir="runs/sft", learning_rate=1.41e-5, per_device_train_batch_size=64, gradient_accumulation_steps=16,
    max_seq_length=512, dataset_text_field="text", logging_steps=1, num_train_epochs=3.0,
)


def main(argv: Optional[Sequence[str]] = None):
    from rljax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if has_flag(argv, "model_name_or_path"):
        return cli.main(["sft", *argv], defaults=ONLINE_DEFAULTS)
    assets = offline_assets()
    defaults = dict(OFFLINE_DEFAULTS, model_name_or_path=assets["model"], dataset_name=assets["reviews"])
    return cli.main(["sft", *argv], defaults=defaults)


if __name__ == "__main__":
    main()
