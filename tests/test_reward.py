"""rljax.reward: RewardTrainer learns a preference, matches reward_loss, honours margins
per pair, rejects datasets without TRL's columns, saves an HF score model, and
make_reward_fn scores batches for PPO.

Tiny GPT-2 trunk (2 layers, 32 wide, no dropout) under the sequence-score head.
"""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.data import tokenize_preference_dataset
from rljax.losses import reward_loss
from rljax.models import SequenceScoreModel, init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.reward import as_score_model, make_reward_fn
from rljax.trainers.reward import RewardConfig, RewardTrainer

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "box"]


def gpt2_config(tokenizer):
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )


@pytest.fixture(scope="module")
def score_model(tiny_tokenizer):
    module = SequenceScoreModel(gpt2_config(tiny_tokenizer), num_labels=1)
    return module, init_params(module, jax.random.PRNGKey(0))


def preference_rows(n, seed):
    """Chosen texts say "good", rejected ones "bad", at a random place among random words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(4)]
        at = rng.randrange(5)
        rows.append({
            "chosen": " ".join(words[:at] + ["good"] + words[at:]),
            "rejected": " ".join(words[:at] + ["bad"] + words[at:]),
        })
    return rows


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=3e-3, max_steps=40, logging_steps=20, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", seed=0, max_length=64, remove_unused_columns=False,
    )
    base.update(kw)
    return RewardConfig(**base)


def test_reward_model_learns_preference(tiny_tokenizer, score_model, tmp_path):
    train = tokenize_preference_dataset(preference_rows(96, 0), tiny_tokenizer)
    held_out = tokenize_preference_dataset(preference_rows(32, 1), tiny_tokenizer)
    trainer = RewardTrainer(score_model, config(tmp_path), train_dataset=train, eval_dataset=held_out, tokenizer=tiny_tokenizer)
    before = trainer.evaluate()
    assert set(before) == {"eval_loss", "eval_accuracy", "eval_accuracy_strict", "eval_rewards_chosen", "eval_rewards_rejected",
                           "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    out = trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy_strict"] >= 0.9, after
    assert after["eval_loss"] < before["eval_loss"] - 0.3, (before, after)
    assert after["eval_rewards_chosen"] > after["eval_rewards_rejected"]
    assert out["step"] == 40

    # make_reward_fn scores padded rows like the trainer, left- or right-padded
    score = make_reward_fn(trainer.model, trainer.params)
    ids = [tiny_tokenizer(t)["input_ids"] for t in ("cat good sat", "cat bad sat")]
    width = 16
    right = np.zeros((2, width), np.int32)
    left = np.zeros((2, width), np.int32)
    rmask, lmask = np.zeros_like(right), np.zeros_like(left)
    for i, x in enumerate(ids):
        right[i, : len(x)], rmask[i, : len(x)] = x, 1
        left[i, width - len(x):], lmask[i, width - len(x):] = x, 1
    r_right, r_left = np.asarray(score(right, rmask)), np.asarray(score(left, lmask))
    assert r_right.shape == (2,) and r_right[0] > r_right[1]
    np.testing.assert_allclose(r_right, r_left, atol=1e-4)

    # save_model -> transformers' GPT2ForSequenceClassification gives the same scores
    torch = pytest.importorskip("torch")
    from transformers import GPT2ForSequenceClassification

    trainer.save_model(str(tmp_path / "rm"))
    hf = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(right, dtype=torch.long), attention_mask=torch.tensor(rmask)).logits[:, 0].numpy()
    np.testing.assert_allclose(r_right, theirs, atol=1e-4)


def test_reward_loss_parity_and_per_pair_margin(tiny_tokenizer, score_model, tmp_path):
    rows = preference_rows(4, 2)
    for i, r in enumerate(rows):
        r["margin"] = [0.0, 0.5, -1.0, 2.0][i]
    ds = tokenize_preference_dataset(rows, tiny_tokenizer)
    assert "margin" in ds.column_names
    trainer = RewardTrainer(score_model, config(tmp_path), train_dataset=ds, tokenizer=tiny_tokenizer)
    batch = trainer.collate([ds[i] for i in range(4)])
    np.testing.assert_allclose(batch["margin"], [0.0, 0.5, -1.0, 2.0])
    module, params = score_model
    loss, metrics = jax.jit(trainer.loss_fn)(params, batch, None)

    scores = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask).logits)
    rc = scores(batch["input_ids_chosen"], batch["attention_mask_chosen"])  # [4, 1], as TRL's two forwards
    rr = scores(batch["input_ids_rejected"], batch["attention_mask_rejected"])
    np.testing.assert_allclose(loss, reward_loss(rc, rr, batch["margin"]), rtol=1e-5)
    m = np.asarray(batch["margin"])
    per_pair = np.mean(-jax.nn.log_sigmoid(np.asarray(rc)[:, 0] - np.asarray(rr)[:, 0] - m))
    np.testing.assert_allclose(loss, per_pair, rtol=1e-5)
    trl_broadcast = np.mean(-jax.nn.log_sigmoid(np.asarray(rc) - np.asarray(rr) - m))  # TRL 0.7.11's [B, B]
    assert abs(float(loss) - float(trl_broadcast)) > 1e-3
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.asarray(rc) >= np.asarray(rr)))
    np.testing.assert_allclose(metrics["rewards_chosen"], np.mean(rc), rtol=1e-5)

    # without a margin column: plain Bradley-Terry
    plain = {k: v for k, v in batch.items() if k != "margin"}
    np.testing.assert_allclose(jax.jit(trainer.loss_fn)(params, plain, None)[0], reward_loss(rc, rr), rtol=1e-5)


def test_reward_accuracy_counts_ties_as_correct():
    from rljax.reward import make_reward_loss

    class Fixed:  # a stand-in module whose "scores" are the first token id
        def apply(self, variables, ids, mask, deterministic=True, **kw):
            class Out:
                logits = ids[:, :1].astype(jnp.float32)
            return Out

    batch = {
        "input_ids_chosen": jnp.array([[1], [9]]), "attention_mask_chosen": jnp.ones((2, 1), jnp.int32),
        "input_ids_rejected": jnp.array([[1], [5]]), "attention_mask_rejected": jnp.ones((2, 1), jnp.int32),
    }
    _, metrics = make_reward_loss(Fixed())(None, batch, None)
    assert float(metrics["accuracy"]) == 1.0 and float(metrics["accuracy_strict"]) == 0.5


def test_reward_trainer_input_errors(tiny_tokenizer, score_model, tmp_path):
    ds = tokenize_preference_dataset(preference_rows(4, 3), tiny_tokenizer)
    with pytest.raises(ValueError, match="attention_mask_rejected"):
        RewardTrainer(score_model, config(tmp_path), train_dataset=ds.remove_columns("attention_mask_rejected"), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="tokenize_preference_dataset"):
        RewardTrainer(score_model, config(tmp_path), train_dataset=preference_rows(4, 3), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        RewardTrainer(score_model, config(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match="both"):
        RewardTrainer(score_model, config(tmp_path, max_length=64), train_dataset=ds, tokenizer=tiny_tokenizer, max_length=32)
    two = SequenceScoreModel(gpt2_config(tiny_tokenizer), num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        RewardTrainer((two, jax.eval_shape(lambda: init_params(two, jax.random.PRNGKey(0)))), config(tmp_path),
                      train_dataset=ds, tokenizer=tiny_tokenizer)


def test_causal_lm_becomes_score_model(tiny_tokenizer, score_model):
    lm = model_from_config(gpt2_config(tiny_tokenizer))
    params = {"transformer": score_model[1]["transformer"]}  # GPT-2's LM head is tied: no extra params
    module, score_params = as_score_model((lm, params))
    assert isinstance(module, SequenceScoreModel) and module.num_labels == 1
    assert set(score_params) == {"transformer", "score"}
    assert score_params["transformer"] is params["transformer"]
