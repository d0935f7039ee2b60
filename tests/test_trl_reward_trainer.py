"""TRL 0.7.11's tests/test_reward_trainer.py on rljax: same cases, same inputs and expected
numbers, with a tiny GPT-2 saved locally (2 layers, 32 wide) instead of the hub's
``trl-internal-testing/dummy-GPT2-correct-vocab``.

Differences in the port (each a deliberate rljax behaviour, see README "Porting from TRL"):
the score model is loaded with ``num_labels=1`` (TRL's test loads the hub default, 2 labels,
which TRL silently broadcasts into the loss; rljax rejects it); a dataset without TRL's
columns fails when the trainer is built (TRL: inside ``train()``), so the construction is
inside ``pytest.raises``; parameters are compared as pytrees (no ``named_parameters``).
"""
import copy

import jax
import numpy as np
import pytest
from datasets import Dataset

from rljax.models import AutoModelForSequenceClassification, init_params, model_from_config, save_pretrained
from rljax.models.gpt2 import GPT2Config
from rljax.trainers.base import EvalPrediction
from rljax.trainers.reward import RewardConfig, RewardTrainer, compute_accuracy


@pytest.fixture(scope="module")
def model_path(tiny_tokenizer, tmp_path_factory):
    """A tiny causal GPT-2 checkpoint (TRL's test loads a causal-LM checkpoint as a classifier)."""
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    module = model_from_config(cfg)
    path = str(tmp_path_factory.mktemp("dummy-gpt2"))
    save_pretrained(module, init_params(module, jax.random.PRNGKey(0)), path)
    return path


@pytest.fixture()
def model(model_path):
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)


@pytest.fixture()
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the session tokenizer stays untouched
    tok.pad_token = tok.eos_token  # as TRL's setUpClass
    return tok


def leaves(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def dummy_dataset():
    # fmt: off
    return Dataset.from_dict({
        "input_ids_chosen": [[0, 1, 2], [1, 2], [0, 1, 2], [1, 2]],
        "attention_mask_chosen": [[1, 1, 1], [1, 0], [1, 1, 1], [1, 0]],
        "input_ids_rejected": [[0, 2], [1, 2, 0], [0, 2], [1, 2, 0]],
        "attention_mask_rejected": [[1, 1], [1, 1, 0], [1, 1], [1, 1, 1]],
    })
    # fmt: on


def test_accuracy_metrics():
    dummy_eval_predictions = EvalPrediction(np.array([[0.1, 0.9], [0.9, 0.1]], np.float32), np.array([0, 0]))
    accuracy = compute_accuracy(dummy_eval_predictions)
    assert accuracy["accuracy"] == 0.5


def test_reward_trainer(model, tokenizer, tmp_path):
    training_args = RewardConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, remove_unused_columns=False,
        gradient_accumulation_steps=4, learning_rate=9e-1, evaluation_strategy="steps", disable_tqdm=True,
    )
    with pytest.warns(UserWarning, match="fewer than one batch"):  # 4 examples < 2 x 4: HF trains anyway
        trainer = RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset(),
                                eval_dataset=dummy_dataset())
        previous_trainable_params = leaves(trainer.model.params)
        trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None

    # check the params have changed - ignore 0 biases
    new_params = leaves(trainer.model.params)
    for n, param in previous_trainable_params.items():
        if param.sum() != 0:
            assert not np.array_equal(param, new_params[n]), n

    preds = trainer.predict(dummy_dataset())
    assert preds.predictions.shape == (4, 2)


@pytest.mark.slow
def test_reward_trainer_peft(model, tokenizer, tmp_path):
    from rljax.models.peft import LoraConfig, TaskType

    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    training_args = RewardConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, remove_unused_columns=False,
        gradient_accumulation_steps=2, learning_rate=9e-1, evaluation_strategy="steps", disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset(),
                            eval_dataset=dummy_dataset(), peft_config=peft_config)
    # PEFT >= 0.3 names the trained score head "modules_to_save"; rljax trains ``score`` in place.
    trainable_params_name = ["lora", "score"]
    params = leaves(trainer.model.params)
    previous_trainable_params = {n: p for n, p in params.items() if any(t in n for t in trainable_params_name)}
    previous_non_trainable_params = {n: p for n, p in params.items() if n not in previous_trainable_params}
    assert previous_trainable_params and previous_non_trainable_params

    trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    new_params = leaves(trainer.model.params)
    # check the params have changed
    for n, param in previous_trainable_params.items():
        assert not np.allclose(param, new_params[n], atol=1e-12, rtol=1e-12), n
    # check the non trainable params have not changed
    for n, param in previous_non_trainable_params.items():
        assert np.allclose(param, new_params[n], atol=1e-12, rtol=1e-12), n

    preds = trainer.predict(dummy_dataset())
    assert preds.predictions.shape == (4, 2)


def test_reward_trainer_assert_value_error(model, tokenizer, tmp_path):
    training_args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                 remove_unused_columns=False, disable_tqdm=True)
    # fmt: off
    dummy_dataset = Dataset.from_dict({
        "input_ids_b": [[0, 1, 2], [1, 2], [0, 1, 2], [1, 2]],
        "attention_mask_c": [[1, 1, 1], [1, 0], [1, 1, 1], [1, 0]],
        "input_ids_f": [[0, 2], [1, 2, 0], [0, 2], [1, 2, 0]],
        "attention_mask_g": [[1, 1], [1, 1, 0], [1, 1], [1, 1, 1]],
    })
    # fmt: on
    with pytest.raises(ValueError):
        trainer = RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset)
        trainer.train()

    training_args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                 remove_unused_columns=True, disable_tqdm=True)
    with pytest.warns(UserWarning, match="remove_unused_columns"), pytest.raises(ValueError, match="input_ids_chosen"):
        RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset)


def test_reward_trainer_margin(model, tokenizer, tmp_path):
    training_args = RewardConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, remove_unused_columns=False,
        gradient_accumulation_steps=4, learning_rate=9e-1, evaluation_strategy="steps", disable_tqdm=True,
    )
    dummy_dataset = Dataset.from_dict({
        "input_ids_chosen": [[0, 1, 2]], "attention_mask_chosen": [[1, 1, 1]],
        "input_ids_rejected": [[0, 2]], "attention_mask_rejected": [[1, 1]], "margin": [[1.0]],
    })
    trainer = RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset,
                            eval_dataset=dummy_dataset)

    batch = [dummy_dataset[0]]
    batch = trainer.data_collator(batch)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)

    l_val = np.mean(-jax.nn.log_sigmoid(outputs["rewards_chosen"] - outputs["rewards_rejected"] - batch["margin"]))

    assert abs(loss - l_val) < 1e-6


def test_reward_trainer_tags(model, tokenizer, tmp_path):
    training_args = RewardConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, remove_unused_columns=False,
        gradient_accumulation_steps=4, learning_rate=9e-1, evaluation_strategy="steps", disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=training_args, tokenizer=tokenizer, train_dataset=dummy_dataset(),
                            eval_dataset=dummy_dataset())

    assert trainer.model.model_tags == trainer._tag_names
