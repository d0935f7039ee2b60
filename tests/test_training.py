"""rljax.trainers.base.Trainer: resumable checkpoints (checkpoint-<step>/train_state) continue a run
bitwise, through train(resume_from_checkpoint=...) or TrainingArguments.resume_from_checkpoint; and
HF Trainer semantics (log_history summary, TrainerState, callbacks, epoch/final checkpoints,
save_total_limit, small datasets, --optim, gradient_checkpointing, optimizers=(tx, schedule),
trained params written back to the model object, model tags)."""
import json
import os

import jax
import jax.numpy as jnp
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


# --------------------------------------------------------------------------------------------
# HF Trainer semantics of the shared loop (toy least-squares trainer: compiles in < 1 s)
# --------------------------------------------------------------------------------------------


def test_log_history_ends_with_the_run_summary_and_state_tracks_progress(tmp_path):
    trainer = _toy_trainer(tmp_path / "out", logging_steps=1, logging_first_step=True)
    out = trainer.train()
    summary = trainer.state.log_history[-1]
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
            "epoch", "step"} <= set(summary)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert summary["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert summary["step"] == trainer.state.global_step == out.global_step == 4
    assert trainer.state.epoch == 1.0 and summary["total_flos"] == 0.0  # no *input_ids in the toy batch
    assert out.training_loss == summary["train_loss"] and out.metrics["train_loss"] == summary["train_loss"]
    assert out["loss"] == losses[-1] and trainer.log_history is trainer.state.log_history
    # HF logs the learning rate its scheduler holds after the update (linear decay from 0.1 over 4 updates)
    assert [h["learning_rate"] for h in trainer.log_history if "loss" in h] == pytest.approx([0.075, 0.05, 0.025, 0.0])


class Recorder:
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step_end", state.global_step))
        if state.global_step == self.stop_at:
            control.should_training_stop = True
            control.should_save = True

    def on_train_end(self, args, state, control, model=None, **kw):
        self.events.append(("train_end", state.global_step))


def test_callbacks_see_events_and_can_stop_and_save(tmp_path):
    from rljax.trainers.base import Trainer

    trainer = _toy_trainer(tmp_path / "out", max_steps=8, logging_steps=2)
    rec = Recorder(stop_at=3)
    trainer.add_callback(rec)
    trainer.train()
    steps = [e[1] for e in rec.events if e[0] == "step_end"]
    assert steps == [1, 2, 3] and rec.events[-1] == ("train_end", 3)
    assert [e[1] for e in rec.events if e[0] == "log"] == [2, 3]  # step 2, then the summary at the stop
    assert (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").is_file()
    with pytest.raises(TypeError, match="TrainerCallback events"):
        Trainer(None, {"w": 0}, trainer.args, callbacks=[object()])


def test_checkpoints_at_epoch_ends_and_final_step_with_save_total_limit(tmp_path):
    # 32 examples / 8 per update = 4 updates per epoch; 10 updates -> epoch ends at 4, 8, final at 10
    trainer = _toy_trainer(tmp_path / "out", max_steps=10, save_strategy="epoch")
    trainer.train()
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-10", "checkpoint-4", "checkpoint-8", "metrics.jsonl"]
    state = json.load(open(tmp_path / "out" / "checkpoint-8" / "trainer_state.json"))
    assert state["global_step"] == 8 and state["epoch"] == 2.0

    limited = _toy_trainer(tmp_path / "lim", max_steps=10, save_strategy="steps", save_steps=3, save_total_limit=2)
    limited.train()
    kept = sorted(d for d in os.listdir(tmp_path / "lim") if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-10", "checkpoint-9"]  # 3 and 6 deleted once newer ones were complete


def test_dataset_smaller_than_one_batch_trains_with_a_warning(tmp_path):
    trainer = _toy_trainer(tmp_path / "out", per_device_train_batch_size=16, gradient_accumulation_steps=4)
    with pytest.warns(UserWarning, match="fewer than one batch"):
        out = trainer.train()
    assert out.global_step == 4 and not np.allclose(_final(trainer), 0.0)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "lion_32bit"])
def test_optim_names_map_to_optax_and_train(tmp_path, optim):
    trainer = _toy_trainer(tmp_path / optim, optim=optim, weight_decay=0.01, learning_rate=0.05,
                           lr_scheduler_type="constant")
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    assert losses[-1] < losses[0], (optim, losses)


def test_bad_training_arguments_fail_early(tmp_path):
    from rljax.trainers.base import TrainingArguments

    with pytest.raises(ValueError, match="adamw_torch"):
        TrainingArguments(output_dir=str(tmp_path), optim="adamw_nope")
    with pytest.raises(ValueError, match="offline"):
        TrainingArguments(output_dir=str(tmp_path), push_to_hub=True)
    with pytest.raises(ValueError, match="only use_reentrant"):
        TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing_kwargs={"preserve_rng_state": True})
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing_kwargs='{"use_reentrant": false}')
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    from rljax.trainers.base import make_optimizer

    with pytest.warns(UserWarning, match="float32"):  # 8-bit optimizers: same rule, float32 state
        make_optimizer(TrainingArguments(output_dir=str(tmp_path), optim="adamw_bnb_8bit"), 10)


def test_gradient_checkpointing_rematerialises_and_gives_the_same_update(tmp_path):
    from rljax.trainers.base import make_train_step

    plain = _toy_trainer(tmp_path / "a")
    remat = _toy_trainer(tmp_path / "b", gradient_checkpointing=True)
    plain.train(), remat.train()
    np.testing.assert_allclose(_final(plain), _final(remat), rtol=1e-6)
    step = make_train_step(remat.loss_fn, 1, donate=False, gradient_checkpointing=True)
    batch = remat.collate(remat.train_dataset[:8])
    assert "checkpoint" in str(jax.make_jaxpr(step)(remat.train_state, batch)) or "remat" in str(
        jax.make_jaxpr(step)(remat.train_state, batch))


def test_user_optimizer_and_schedule(tmp_path):
    import optax

    def with_optimizers(path, optimizers):
        toy = _toy_trainer(path, logging_steps=1)
        return type(toy)(None, {"w": jnp.zeros(3)}, toy.args, train_dataset=toy.train_dataset, optimizers=optimizers)

    # (tx, None): HF scales the user's optimizer by the args' schedule (linear decay here)
    trainer = with_optimizers(tmp_path / "a", (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), None))
    trainer.train()
    assert [h["learning_rate"] for h in trainer.log_history if "loss" in h] == pytest.approx([0.075, 0.05, 0.025, 0.0])
    # (None, schedule): the args' optimizer on the user's schedule
    trainer = with_optimizers(tmp_path / "b", (None, optax.constant_schedule(0.02)))
    trainer.train()
    assert [h["learning_rate"] for h in trainer.log_history if "loss" in h] == pytest.approx([0.02] * 4)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        with_optimizers(tmp_path / "c", (object(), None))


def test_trained_params_are_written_back_and_tags_reach_the_model_card(tmp_path):
    from types import SimpleNamespace

    from rljax.trainers.base import Trainer

    toy = _toy_trainer(tmp_path / "x")
    wrapper = SimpleNamespace(module=None, params={"w": jnp.zeros(3)})

    class Tagged(type(toy)):
        _tag_names = ["trl", "toy"]

    trainer = Tagged(wrapper, None, toy.args, train_dataset=toy.train_dataset)
    assert trainer.model is wrapper and wrapper.model_tags == ["trl", "toy"]
    trainer.train()
    np.testing.assert_array_equal(np.asarray(wrapper.params["w"]), _final(trainer))
    trainer.save_model(str(tmp_path / "saved"))
    card = open(tmp_path / "saved" / "README.md").read()
    assert "- trl\n- toy" in card
    assert isinstance(trainer, Trainer)
