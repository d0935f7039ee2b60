"""Failure behaviour: nothing lost at exit or after a kill (issue: checkpoints that survive kills)."""
import os
import subprocess
import re
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from rljax.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], async_save=True)
    ck.save(3, {"w": jnp.full((128, 128), 2.0)}, extra={"data_position": 7})
    print("saved; exiting without close()", flush=True)
    """
)


def _run(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_async_save_without_close_is_committed_at_exit(tmp_path):
    """A started async save that is never waited for is committed at interpreter exit
    (no hang, no 'cannot schedule new futures after interpreter shutdown')."""
    d = str(tmp_path / "ck")
    proc = _run(_SCRIPT, d)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot schedule new futures" not in proc.stderr
    assert sorted(os.listdir(d)) == ["3"]
    assert os.path.isfile(os.path.join(d, "3", "rljax_commit.json"))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.checkpoint import Checkpointer

    with Checkpointer(d, resume=True) as ck:
        assert ck.latest_step() == 3
        state, extra = ck.restore(target_state={"w": jax.ShapeDtypeStruct((128, 128), jnp.float32)})
        assert extra["data_position"] == 7
    np.testing.assert_array_equal(np.asarray(state["w"]), 2.0)


def test_console_script_exit_codes(monkeypatch, capsys):
    """`rljax ...` exits 0 after a successful run (main() returns the result dict, which the
    console script must not pass to sys.exit) and 1 with one line, no traceback, on a user error."""
    from rljax import cli

    monkeypatch.setattr(cli, "main", lambda argv: {"train_loss": 1.0, "output_dir": "x"})
    assert cli.cli(["sft"]) == 0
    monkeypatch.setattr(cli, "main", lambda argv: (_ for _ in ()).throw(ValueError("no column 'text'; pass --dataset_text_field")))
    assert cli.cli(["sft", "--x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "rljax sft: error: no column 'text'; pass --dataset_text_field"
    monkeypatch.setenv("RLJAX_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.cli(["sft"])


def test_python_dash_m_rljax_help_exits_zero():
    proc = _run("import runpy, sys; sys.argv = ['rljax', '--help']; runpy.run_module('rljax', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sft" in proc.stdout


@pytest.fixture(scope="module")
def tiny_lm():
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config

    module = model_from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    import jax

    return module, init_params(module, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=2, min_new_tokens=3), "min_new_tokens=3 exceeds max_new_tokens=2"),
        (dict(max_new_tokens=2, batch=0), "at least one prompt"),
    ],
)
def test_generate_rejects_impossible_requests(tiny_lm, kwargs, match):
    import jax
    import numpy as np

    from rljax.generation import generate

    module, params = tiny_lm
    batch = kwargs.pop("batch", 2)
    ids = np.ones((batch, 3), np.int32)
    with pytest.raises(ValueError, match=match):
        generate(module, params, ids, np.ones_like(ids), jax.random.PRNGKey(0), eos_token_id=1, pad_token_id=0, **kwargs)


def test_make_train_rejects_a_right_padded_bank_and_a_wrongly_shaped_reward(tiny_lm):
    """The functional loop checks what would otherwise train on wrong numbers: a right-padded
    prompt bank (up front) and a reward_fn returning per-token rewards (at trace time, named)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.generation import make_generate_fn
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import PPOTrainState, make_train

    lm, lm_params = tiny_lm
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, lm_params)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1)
    gen = make_generate_fn(model.module, max_new_tokens=3, pad_token_id=0, jit=False)
    prompts = np.full((8, 4), 5, np.int32)
    right_padded = np.ones_like(prompts)
    right_padded[0, -1] = 0
    state = PPOTrainState.create(model.params, model.params, config)
    train = make_train(model.module, config, gen, lambda _, r: r.response_mask.sum(-1), 2)
    with pytest.raises(ValueError, match="prompt_mask.*right-padded.*padding_side = 'left'"):
        train(state, None, prompts, right_padded)  # checked before anything runs

    per_token = make_train(model.module, config, gen, lambda _, r: r.response_mask.astype(jnp.float32), 2)
    with pytest.raises(ValueError, match=r"reward_fn must return one score per rollout row, shape \(4,\)"):
        jax.eval_shape(per_token, state, None, prompts, np.ones_like(prompts))


def test_bf16_computes_in_bfloat16_with_float32_master_params(tiny_lm, tiny_tokenizer):
    """TrainingArguments(bf16=True) is honoured: the step's matmuls run in bfloat16, while the
    params, their gradients and the optimizer state stay float32 (HF's bf16 autocast)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from rljax.sft import make_sft_loss
    from rljax.train_state import TrainState
    from rljax.trainers.base import make_train_step, module_in_dtype

    module, params = tiny_lm
    loss_fn = make_sft_loss(module_in_dtype(module, jnp.bfloat16))
    ids = np.tile(np.arange(3, 11, dtype=np.int32), (2, 1))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    bf16_matmul = re.compile(r"bf16\[[^\]]*\] = dot_general")
    jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: loss_fn(q, batch, None)[0])(p))(params))
    assert bf16_matmul.search(jaxpr)
    # the trainers' steps (train, eval, predictions) are built from these when args.bf16 is set
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    for bf16 in (True, False):
        args = SFTConfig(output_dir="unused", bf16=bf16, report_to=[], max_seq_length=8, dataset_text_field="text")
        trainer = SFTTrainer((module, params), args=args, tokenizer=tiny_tokenizer, compute_metrics=lambda p: {})
        traced = [jax.make_jaxpr(lambda p: trainer.loss_fn(p, batch, None))(params),
                  jax.make_jaxpr(lambda p: trainer.predict_fn(p, batch))(params)]
        assert all(bool(bf16_matmul.search(str(j))) == bf16 for j in traced)
    state = TrainState.create(params, optax.adam(1e-2))
    step = make_train_step(loss_fn, donate=False)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32 and losses[-1] < losses[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(state.opt_state))


def test_a_nan_loss_stops_training_with_a_clear_message(tiny_tokenizer, tmp_path):
    """A NaN loss (as float16 overflow gives; here: NaN weights) must not carry on silently."""
    import datasets

    from rljax.trainers.sft import SFTConfig, SFTTrainer
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    import jax
    import jax.numpy as jnp

    module = model_from_config(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    params = init_params(module, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 else p, params)  # a broken model
    ds = datasets.Dataset.from_dict({"text": ["the movie was great"] * 8})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=4,
                     dataset_text_field="text", max_seq_length=16, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer((module, params), args=args, train_dataset=ds, tokenizer=tiny_tokenizer)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1.*bfloat16 or float32"):
        trainer.train()


def test_save_total_limit_counts_only_committed_checkpoints(tmp_path):
    """A half-written newer checkpoint (a killed save) must not push the last good one out."""
    import jax.numpy as jnp

    from rljax.trainers.base import TRAIN_STATE_DIR, rotate_checkpoints, save_train_state

    for step in (1, 2, 3):
        save_train_state(str(tmp_path / f"checkpoint-{step}"), {"w": jnp.full((4,), float(step))}, step, step)
    os.makedirs(tmp_path / "checkpoint-4" / TRAIN_STATE_DIR / "4.orbax-checkpoint-tmp-0")
    rotate_checkpoints(str(tmp_path), save_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    """A killed run's metrics.jsonl lines past its last checkpoint (and a torn last line) go, so
    the resumed run does not log those steps twice."""
    from rljax.logging import drop_jsonl_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.0}\n{"step": 4, "lo')
    assert drop_jsonl_records_after(str(path), 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
    assert drop_jsonl_records_after(str(tmp_path / "missing.jsonl"), 2) == 0


def test_token_ids_past_the_models_vocabulary_are_rejected_before_training(tiny_tokenizer, tmp_path):
    """A tokenizer with more tokens than the model's vocab_size: JAX's embedding gather would
    return NaN for the extra ids and the run would train on NaN; the batch check names the fix."""
    import datasets
    import jax

    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    module = model_from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    ds = datasets.Dataset.from_dict({"text": ["the movie was great"] * 8})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, dataset_text_field="text",
                     max_seq_length=16, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer((module, init_params(module, jax.random.PRNGKey(0))), args=args, train_dataset=ds,
                         tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 64\).*vocab_size=len\(tokenizer\)"):
        trainer.train()
