"""Reward modelling, TRL's ``examples/scripts/reward_modeling.py`` the rljax way: a thin wrapper
over ``rljax reward`` (see ``rljax reward --help``).

    python experiments/reward_modeling.py            # offline: VADER preference pairs, tiny GPT-2 trunk
    python experiments/reward_modeling.py --model_name_or_path gpt2 --dataset_name Anthropic/hh-rlhf

Offline, the pairs (two reviews of the same opening, the one VADER finds more positive is
"chosen") come from the quickstart's builders; the trunk is the SFT model in ``runs/sft`` when
experiments/sft.py has written one, else the tiny random GPT-2. A sequence-score head
(``*ForSequenceClassification``, one logit) is trained and saved to ``runs/reward_model``, the
reward model that ``rljax ppo --reward_model runs/reward_model`` uses.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from _offline import has_flag, offline_assets

OFFLINE_DEFAULTS = dict(
    output_dir="runs/reward_model", overwrite_output_dir=True, learning_rate=1e-3, per_device_train_batch_size=32,
    max_steps=120, logging_steps=20, max_length=32, save_strategy="no",
)
# TRL's example defaults (facebook/opt-350m on Anthropic/hh-rlhf).
ONLINE_DEFAULTS = dict(
    output_dir="runs/reward_model", learning_rate=1.41e-5, per_device_train_batch_size=64, max_length=512,
    num_train_epochs=1.0, logging_steps=10,
)


def main(argv: Optional[Sequence[str]] = None):
    from rljax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if has_flag(argv, "model_name_or_path"):
        return cli.main(["reward", *argv], defaults=ONLINE_DEFAULTS)
    assets = offline_assets()
    trunk = "runs/sft" if os.path.exists(os.path.join("runs", "sft", "model.safetensors")) else assets["model"]
    print(f"[reward_modeling] trunk: {trunk}")
    defaults = dict(OFFLINE_DEFAULTS, model_name_or_path=trunk, tokenizer_name=assets["model"], dataset_name=assets["pairs"])
    return cli.main(["reward", *argv], defaults=defaults)


if __name__ == "__main__":
    main()
