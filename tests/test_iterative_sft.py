"""rljax.iterative_sft: step() trains from token ids and from texts with a persistent
optimizer, truncates sequences (not the batch), honours texts_labels and labels, pads a
short last minibatch without changing the update, and validates its inputs.

Tiny GPT-2 (2 layers, 32 wide, no dropout) over the character-level session tokenizer.
"""
import jax
import numpy as np
import pytest

from rljax.trainers.iterative_sft import IterativeSFTTrainer
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.trainers.base import TrainingArguments

TEXTS = [
    "the cat sat on the mat",
    "the dog ran to a big red box",
    "a red cat sat on a big box",
    "the big dog sat on the mat",
    "a cat ran to the red mat",
    "the dog sat on a red box",
]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    cfg = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    module = model_from_config(cfg)
    return module, init_params(module, jax.random.PRNGKey(0))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=8,
                learning_rate=3e-3, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def flat(params):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])


def test_step_from_ids_and_texts_lowers_loss(tiny_tokenizer, model, tmp_path):
    trainer = IterativeSFTTrainer(model, args(tmp_path), tiny_tokenizer)
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    before = trainer.evaluate(input_ids=ids)["eval_loss"]
    assert before == pytest.approx(trainer.evaluate(texts=TEXTS)["eval_loss"], rel=1e-6)
    # a right-padded 2-D array with its mask is the same data
    width = max(map(len, ids))
    arr = np.zeros((len(ids), width), np.int64)
    mask = np.zeros_like(arr)
    for i, x in enumerate(ids):
        arr[i, : len(x)], mask[i, : len(x)] = x, 1
    assert trainer.evaluate(input_ids=arr, attention_mask=mask)["eval_loss"] == pytest.approx(before, rel=1e-6)

    for _ in range(6):
        stats = trainer.step(input_ids=ids)
    assert stats["num_updates"] == 3 and stats["step"] == 18  # 6 samples / 2 per update, persistent count
    assert stats["num_tokens"] == sum(len(x) - 1 for x in ids)
    mid = trainer.evaluate(input_ids=ids)["eval_loss"]
    assert mid < 0.7 * before, (before, mid)
    assert not np.allclose(flat(trainer.params), flat(model[1]))

    for _ in range(6):
        stats = trainer.step(texts=TEXTS)
    after = trainer.evaluate(texts=TEXTS)["eval_loss"]
    assert after < 0.8 * mid, (mid, after)
    assert int(trainer.train_state.step) == 36 and stats["learning_rate"] == pytest.approx(3e-3)
    assert len(trainer.log_history) >= 12


def test_truncation_cuts_sequences_not_the_batch(tiny_tokenizer, model, tmp_path):
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    labels = [[-100] * 3 + x[3:] for x in ids]
    end = IterativeSFTTrainer(model, args(tmp_path), tiny_tokenizer, max_length=5)
    rows = end.prepare_inputs(input_ids=ids, labels=labels)
    assert len(rows) == len(TEXTS)
    for r, x in zip(rows, ids):
        np.testing.assert_array_equal(r["input_ids"], x[-5:])
        np.testing.assert_array_equal(r["labels"], x[-5:])
    start = IterativeSFTTrainer(model, args(tmp_path), tiny_tokenizer, max_length=5, truncation_mode="keep_start")
    rows = start.prepare_inputs(input_ids=ids, labels=labels)
    assert len(rows) == len(TEXTS)
    for r, x in zip(rows, ids):
        np.testing.assert_array_equal(r["input_ids"], x[:5])
        np.testing.assert_array_equal(r["labels"], [-100] * 3 + x[3:5])  # labels are honoured
    rows = start.prepare_inputs(texts=TEXTS)
    assert len(rows) == len(TEXTS) and all(len(r["input_ids"]) == 5 for r in rows)


def test_texts_labels_are_the_trained_targets(tiny_tokenizer, model, tmp_path):
    prompts = ["Question: two plus two ? Answer:", "Question: a cat ? Answer:", "Question: a dog ? Answer:"]
    targets = [" four", " meow", " woof"]
    trainer = IterativeSFTTrainer(model, args(tmp_path, per_device_train_batch_size=4), tiny_tokenizer)
    rows = trainer.prepare_inputs(texts=prompts, texts_labels=targets)
    for r, p, t in zip(rows, prompts, targets):
        p_ids = tiny_tokenizer(p)["input_ids"]
        t_ids = tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(r["input_ids"], p_ids + t_ids)
        np.testing.assert_array_equal(r["labels"], [-100] * len(p_ids) + t_ids)
    before = trainer.evaluate(texts=prompts, texts_labels=targets)
    assert before["eval_num_tokens"] == sum(len(t) for t in targets)  # one token per character
    for _ in range(15):
        stats = trainer.step(texts=prompts, texts_labels=targets)
    assert stats["num_tokens"] == before["eval_num_tokens"] and stats["num_updates"] == 1
    after = trainer.evaluate(texts=prompts, texts_labels=targets)["eval_loss"]
    assert after < 0.5 * before["eval_loss"], (before, after)


def test_short_last_minibatch_and_accumulation_match_one_exact_batch(tiny_tokenizer, model, tmp_path):
    # 3 samples: bs 2 x GA 2 pads the second micro-batch with a weight-0 filler row; the
    # update must equal one batch of exactly 3. adam_epsilon >> sqrt(v) makes AdamW linear in
    # the gradients, so float rounding is not amplified.
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    kw = dict(learning_rate=0.5, adam_epsilon=10.0)
    padded = IterativeSFTTrainer(model, args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw), tiny_tokenizer)
    exact = IterativeSFTTrainer(model, args(tmp_path, per_device_train_batch_size=3, **kw), tiny_tokenizer)
    for _ in range(2):
        s_padded, s_exact = padded.step(input_ids=ids), exact.step(input_ids=ids)
    assert s_padded["num_updates"] == s_exact["num_updates"] == 1
    assert s_padded["loss"] == pytest.approx(s_exact["loss"], rel=1e-5)
    np.testing.assert_allclose(flat(padded.params), flat(exact.params), atol=1e-5)
    assert not np.allclose(flat(exact.params), flat(model[1]))


def test_step_input_errors(tiny_tokenizer, model, tmp_path):
    trainer = IterativeSFTTrainer(model, args(tmp_path), tiny_tokenizer)
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    with pytest.raises(ValueError, match="not both"):
        trainer.step(input_ids=ids, texts=TEXTS[:2])
    with pytest.raises(ValueError, match="input_ids"):
        trainer.step()
    with pytest.raises(ValueError, match="attention_mask"):
        trainer.step(input_ids=ids, attention_mask=[[1] * len(ids[0])])
    with pytest.raises(ValueError, match="labels"):
        trainer.step(input_ids=ids, labels=[ids[0], ids[1][:-1]])
    with pytest.raises(ValueError, match="same length"):
        trainer.step(texts=TEXTS[:2], texts_labels=["x"])
    with pytest.raises(ValueError, match="texts_labels"):
        trainer.step(input_ids=ids, texts_labels=["x", "y"])
    with pytest.raises(ValueError, match="list of strings"):
        trainer.step(texts="just one string")
    with pytest.raises(ValueError, match="2-D"):
        trainer.step(input_ids=np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="truncation_mode"):
        IterativeSFTTrainer(model, args(tmp_path), tiny_tokenizer, truncation_mode="middle")
    assert trainer.train_state is None  # nothing ran
