"""rljax.trainers.base.Trainer: resumable checkpoints (checkpoint-<step>/train_state) continue a run
bitwise, through train(resume_from_checkpoint=...) or TrainingArguments.resume_from_checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from test_logging import _toy_trainer


def _final(trainer):
    return np.asarray(jax.device_get(trainer.params["w"]))


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    straight = _toy_trainer(tmp_path / "a", save_strategy="steps", save_steps=2)
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "train_state").is_dir() and (tmp_path / "a" / "checkpoint-4" / "train_state").is_dir()  # HF: final step too

    resumed = _toy_trainer(tmp_path / "b", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    np.testing.assert_array_equal(_final(resumed), _final(straight))
    # restored history + the same new entries (the last entry is the run summary: timings differ)
    assert resumed.log_history[:-1] == straight.log_history[:-1]
    assert "train_runtime" in resumed.log_history[-1] and resumed.log_history[-1]["step"] == 4
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [4]

    # The field form (what `rljax sft --resume_from_checkpoint DIR` sets); a parent dir picks the newest.
    via_args = _toy_trainer(tmp_path / "c", resume_from_checkpoint=str(tmp_path / "b"))
    via_args.train()
    np.testing.assert_array_equal(_final(via_args), _final(straight))


def test_resume_from_a_directory_without_checkpoints_fails_clearly(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step>/train_state"):
        _toy_trainer(tmp_path / "out").train(resume_from_checkpoint=str(tmp_path / "empty"))
