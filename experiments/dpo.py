"""Direct preference optimisation, TRL's ``examples/scripts/dpo.py`` the rljax way: a thin
wrapper over ``rljax dpo`` (see ``rljax dpo --help``).

    python experiments/dpo.py                        # offline: VADER preference pairs
    python experiments/dpo.py --beta 0.2 --loss_type ipo
    python experiments/dpo.py --model_name_or_path gpt2 --dataset_name my_pairs.jsonl   # prompt/chosen/rejected

Offline, the policy (and its frozen reference) is the SFT model in ``runs/sft`` when
experiments/sft.py has written one, else the tiny random GPT-2; the pairs come from the
quickstart's builders. Output: ``runs/dpo`` (HF format, metrics.jsonl with TRL's
``rewards/margins``, ``rewards/accuracies``, ...).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from _offline import has_flag, offline_assets

OFFLINE_DEFAULTS = dict(
    output_dir="runs/dpo", overwrite_output_dir=True, learning_rate=5e-4, per_device_train_batch_size=32, max_steps=60,
    logging_steps=10, beta=0.1, max_length=32, max_prompt_length=8, save_strategy="no",
)
# TRL's example defaults (gpt2 on Anthropic/hh-rlhf).
ONLINE_DEFAULTS = dict(
    output_dir="runs/dpo", learning_rate=1e-3, per_device_train_batch_size=4, max_steps=1000, beta=0.1,
    max_length=512, max_prompt_length=128, gradient_accumulation_steps=1, logging_steps=10, warmup_steps=150,
)


def main(argv: Optional[Sequence[str]] = None):
    from rljax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if has_flag(argv, "model_name_or_path"):
        return cli.main(["dpo", *argv], defaults=ONLINE_DEFAULTS)
    assets = offline_assets()
    policy = "runs/sft" if os.path.exists(os.path.join("runs", "sft", "model.safetensors")) else assets["model"]
    print(f"[dpo] policy and reference: {policy}")
    defaults = dict(OFFLINE_DEFAULTS, model_name_or_path=policy, tokenizer_name=assets["model"], dataset_name=assets["pairs"])
    return cli.main(["dpo", *argv], defaults=defaults)


if __name__ == "__main__":
    main()
