"""rljax.sft: SFTTrainer learns, packs, masks prompts, accumulates gradients exactly,
rejects bad input and saves checkpoints transformers can load.

Tiny GPT-2 (2 layers, 32 wide, no dropout) over the character-level session tokenizer.
"""
import json
import os
import random

import jax
import numpy as np
import pytest

from rljax.data import DataCollatorForCompletionOnlyLM
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.trainers.sft import SFTConfig, SFTTrainer

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "box"]


def tiny_model(tokenizer, seed=0):
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    module = model_from_config(cfg)
    return module, init_params(module, jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer)


def corpus(n, seed):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(6))} for _ in range(n)]


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=3e-3, max_steps=40, logging_steps=10, save_strategy="no", disable_tqdm=True,
        max_seq_length=64, dataset_text_field="text", seed=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return SFTConfig(**base)


def flat(params):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, model, tmp_path_factory):
    """40 steps into an output_dir that already holds a file (overwrite_output_dir=True)."""
    tmp = tmp_path_factory.mktemp("sft")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("x")
    trainer = SFTTrainer(model, config(tmp, overwrite_output_dir=True), train_dataset=corpus(64, 0),
                         eval_dataset=corpus(16, 1), tokenizer=tiny_tokenizer)
    before = trainer.evaluate()["eval_loss"]
    out = trainer.train()
    return trainer, before, out, trainer.evaluate(), tmp


def test_sft_lowers_held_out_loss(trained, model):
    trainer, before, out, after, tmp = trained
    assert after["eval_loss"] < 0.7 * before, (before, after)
    assert after["eval_perplexity"] == pytest.approx(np.exp(after["eval_loss"]), rel=1e-5)
    assert out["step"] == 40 and "loss" in out and "grad_norm" in out
    # the caller's params survive the donated train step and are untouched
    assert np.isfinite(flat(model[1])).all()
    assert not np.allclose(flat(model[1]), flat(trainer.params))
    lines = open(os.path.join(str(tmp / "out"), "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]
    assert (tmp / "out" / "keep.txt").exists()


def test_sft_packing_gives_full_length_rows_and_trains(tiny_tokenizer, tmp_path, model):
    trainer = SFTTrainer(
        model, config(tmp_path, packing=True, max_seq_length=32, max_steps=3),
        train_dataset=corpus(64, 0), tokenizer=tiny_tokenizer,
    )
    rows = trainer.train_dataset
    assert len(rows) > 4 and all(len(r["input_ids"]) == 32 for r in rows)
    batch = trainer.collate(rows[:2])
    assert batch["input_ids"].shape == (2, 32) and (batch["labels"] == batch["input_ids"]).all()
    assert (batch["attention_mask"] == 1).all()
    # documents are joined with eos
    assert tiny_tokenizer.eos_token_id in np.concatenate([r["input_ids"] for r in rows])
    before = flat(trainer.params)
    trainer.train()
    assert not np.allclose(before, flat(trainer.params))


def test_sft_completion_only_collator_masks_prompt(tiny_tokenizer, tmp_path, model):
    data = [{"text": f"### Human: {w} ### Assistant: {w} {w}"} for w in WORDS]
    collator = DataCollatorForCompletionOnlyLM("### Assistant:", tokenizer=tiny_tokenizer)
    trainer = SFTTrainer(model, config(tmp_path), data_collator=collator, train_dataset=data, tokenizer=tiny_tokenizer)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(4)])
    template = len(tiny_tokenizer("### Assistant:", add_special_tokens=False)["input_ids"])
    n_response = 0
    for i in range(4):
        ids = batch["input_ids"][i]
        text = tiny_tokenizer.decode(ids[batch["attention_mask"][i] == 1])
        end = text.index("### Assistant:") + template  # one token per character
        assert (batch["labels"][i, :end] == -100).all()
        n = int(batch["attention_mask"][i].sum())
        np.testing.assert_array_equal(batch["labels"][i, end:n], ids[end:n])
        assert (batch["labels"][i, n:] == -100).all()
        n_response += n - end
    # the loss counts exactly the response tokens
    _, metrics = trainer.loss_fn(model[1], batch, None)
    assert int(metrics["num_tokens"]) == n_response

    with pytest.raises(ValueError, match="packing"):
        SFTTrainer(model, config(tmp_path, packing=True), data_collator=collator, train_dataset=data, tokenizer=tiny_tokenizer)


def test_sft_gradient_accumulation_matches_full_batch(tiny_tokenizer, tmp_path, model):
    # Packed rows: every micro-batch counts the same number of tokens, so the mean of the
    # micro-batch means equals the full-batch token mean. adam_epsilon >> sqrt(v) makes
    # AdamW an SGD with momentum (lr / eps): linear in the gradients, so float rounding in
    # near-zero gradients is not amplified the way Adam's normalisation amplifies it.
    kw = dict(packing=True, max_seq_length=32, max_steps=3, learning_rate=0.5, adam_epsilon=10.0,
              weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1)
    full = SFTTrainer(model, config(tmp_path / "a", per_device_train_batch_size=4, **kw), train_dataset=corpus(64, 0), tokenizer=tiny_tokenizer)
    accum = SFTTrainer(model, config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw),
                       train_dataset=corpus(64, 0), tokenizer=tiny_tokenizer)
    out_full, out_accum = full.train(), accum.train()
    np.testing.assert_allclose(flat(accum.params), flat(full.params), atol=1e-5)
    assert out_accum["loss"] == pytest.approx(out_full["loss"], rel=1e-5)
    assert not np.allclose(flat(model[1]), flat(full.params))


def test_sft_bad_inputs(tiny_tokenizer, tmp_path, model):
    with pytest.raises(ValueError, match="dataset_text_field"):
        SFTTrainer(model, config(tmp_path, dataset_text_field="content"), train_dataset=corpus(8, 0), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="`dataset_text_field` or `formatting_func`"):
        SFTTrainer(model, config(tmp_path, dataset_text_field=None, packing=True), train_dataset=corpus(8, 0), tokenizer=tiny_tokenizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    trainer = SFTTrainer(model, config(tmp_path, max_steps=1), train_dataset=corpus(8, 0), tokenizer=tiny_tokenizer)
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        trainer.train()


def test_sft_save_model_loads_in_transformers(trained, tiny_tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, GPT2LMHeadModel

    trainer, *_, tmp = trained
    path = str(tmp / "saved")
    trainer.save_model(path)
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    assert AutoTokenizer.from_pretrained(path).pad_token_id == tiny_tokenizer.pad_token_id
    ids = np.asarray([tiny_tokenizer("the cat sat on the mat")["input_ids"]], np.int32)
    ours = np.asarray(trainer.model.apply({"params": trainer.params}, ids).logits)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_neftune_noise_scale_is_alpha_over_sqrt_len_times_hidden(model):
    from rljax.sft import input_embeddings

    module, params = model
    ids = np.tile(np.arange(3, 53), (8, 1)).astype(np.int32)  # [8, 50]
    mask = np.ones_like(ids)
    mask[:, 40:] = 0  # right padding: the longest row has 40 tokens, TRL's padded width
    clean = np.asarray(input_embeddings(module, params, ids, mask))
    noisy = np.asarray(input_embeddings(module, params, ids, mask, neftune_noise_alpha=5.0, rng=jax.random.PRNGKey(0)))
    noise = noisy - clean
    mag = 5.0 / np.sqrt(40 * 32)  # alpha / sqrt(L * hidden)
    assert np.abs(noise).max() <= mag * (1 + 1e-5) and np.abs(noise).max() > 0.99 * mag
    assert noise.std() == pytest.approx(mag / np.sqrt(3), rel=0.03)  # uniform(-mag, mag)
    assert abs(noise.mean()) < 0.02 * mag
    other = np.asarray(input_embeddings(module, params, ids, mask, neftune_noise_alpha=5.0, rng=jax.random.PRNGKey(1)))
    assert not np.allclose(other, noisy)


def test_neftune_only_in_training(model, tiny_tokenizer, tmp_path):
    _, params = model
    trainer = SFTTrainer(model, config(tmp_path, neftune_noise_alpha=5.0), train_dataset=corpus(8, 0),
                         tokenizer=tiny_tokenizer)
    plain = SFTTrainer(model, config(tmp_path), train_dataset=corpus(8, 0), tokenizer=tiny_tokenizer)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(4)])
    # evaluation (rng None): exactly the model without noise
    assert float(trainer.loss_fn(params, batch, None)[0]) == float(plain.loss_fn(params, batch, None)[0])
    # training: the same dropout key, different loss only through the noise (the model has no dropout)
    key = jax.random.PRNGKey(3)
    assert float(trainer.loss_fn(params, batch, key)[0]) != float(plain.loss_fn(params, batch, key)[0])
    assert float(plain.loss_fn(params, batch, key)[0]) == pytest.approx(float(plain.loss_fn(params, batch, None)[0]), rel=1e-6)
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        SFTTrainer(model, config(tmp_path, neftune_noise_alpha=-1.0), train_dataset=corpus(8, 0), tokenizer=tiny_tokenizer)


def test_sft_trains_on_already_packed_rows_and_rejects_too_little_text(model, tiny_tokenizer, tmp_path):
    from rljax.data import ConstantLengthDataset, pack_sequences

    packed = pack_sequences(corpus(32, 0), tiny_tokenizer, 32, dataset_text_field="text")
    trainer = SFTTrainer(model, config(tmp_path, packing=True, dataset_text_field=None, max_steps=1),
                         train_dataset=packed, tokenizer=tiny_tokenizer)
    assert len(trainer.train_dataset) == len(packed["input_ids"]) and trainer.train_dataset.infinite
    np.testing.assert_array_equal(trainer.collate(trainer.train_dataset[:2])["input_ids"], packed["input_ids"][:2])
    rows = [{"input_ids": x} for x in packed["input_ids"]]  # rows holding input_ids, no text field
    again = SFTTrainer(model, config(tmp_path, packing=True, dataset_text_field=None), train_dataset=rows,
                       tokenizer=tiny_tokenizer)
    np.testing.assert_array_equal(again.collate(again.train_dataset[:2])["labels"], packed["input_ids"][:2])
    cld = ConstantLengthDataset(tiny_tokenizer, corpus(32, 0), dataset_text_field="text", seq_length=32)
    assert len(SFTTrainer(model, config(tmp_path, packing=True), train_dataset=cld, tokenizer=tiny_tokenizer).train_dataset) > 0
    with pytest.raises(ValueError, match="enough samples to at least yield one packed sequence"):
        SFTTrainer(model, config(tmp_path, packing=True, max_seq_length=4096), train_dataset=corpus(2, 0),
                   tokenizer=tiny_tokenizer)


def test_sft_tokenizer_without_pad_token_fails_at_collation_like_trl(model, tiny_tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    trainer = SFTTrainer(model, config(tmp_path), train_dataset=corpus(8, 0), tokenizer=tok)
    assert tok.pad_token is None  # the user's tokenizer is left alone (TRL sets pad only on one it loads)
    rows = [trainer.train_dataset[i] for i in range(2)]
    with pytest.raises(ValueError, match="Asking to pad but the tokenizer does not have a padding token"):
        trainer.collate([rows[0], {"input_ids": rows[1]["input_ids"][:3], "attention_mask": [1, 1, 1]}])
