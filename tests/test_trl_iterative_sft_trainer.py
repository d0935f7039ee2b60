"""TRL 0.7.11's tests/test_iterative_sft_trainer.py on rljax (same cases and inputs).

Changes from TRL's file: imports; a tiny local GPT-2 (2 layers, 32 wide; vocabulary 5304 so
TRL's GPT-2 token ids 5303, 3621, ... are valid) and the session tokenizer instead of hub
models; "every parameter got a gradient" is checked as "every parameter leaf changed" (JAX
keeps no .grad). The T5 cases run on a tiny random rljax T5 (vocabulary 5304 as well) with the
session tokenizer made T5-like (eos appended) instead of
``trl-internal-testing/tiny-T5ForConditionalGeneration-correct-vocab``.
"""
import copy

import jax
import numpy as np
import pytest
from datasets import Dataset

from rljax import TrainingArguments
from rljax.models import AutoModelForCausalLM
from rljax.models.gpt2 import GPT2Config
from rljax.trainers.iterative_sft import IterativeSFTTrainer


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    cfg = GPT2Config(vocab_size=5304, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg, rng=jax.random.PRNGKey(0))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # as TRL's test
    return model, tokenizer


@pytest.fixture(scope="module")
def t5(tiny_tokenizer):
    from _t5_fixtures import t5_like_tokenizer, tiny_t5

    return tiny_t5(5304), t5_like_tokenizer(tiny_tokenizer)


def _init_tensor_dummy_dataset():
    torch = pytest.importorskip("torch")
    dummy_dataset_dict = {
        "input_ids": [torch.tensor([5303, 3621]), torch.tensor([3666, 1438, 318]), torch.tensor([5303, 3621])],
        "attention_mask": [torch.tensor([1, 1]), torch.tensor([1, 1, 1]), torch.tensor([1, 1])],
        "labels": [torch.tensor([5303, 3621]), torch.tensor([3666, 1438, 318]), torch.tensor([5303, 3621])],
    }
    dummy_dataset = Dataset.from_dict(dummy_dataset_dict)
    dummy_dataset.set_format("torch")
    return dummy_dataset


def _init_textual_dummy_dataset():
    dummy_dataset_dict = {
        "texts": ["Testing the IterativeSFTTrainer.", "This is a test of the IterativeSFTTrainer"],
        "texts_labels": ["Testing the IterativeSFTTrainer.", "This is a test of the IterativeSFTTrainer"],
    }
    dummy_dataset = Dataset.from_dict(dummy_dataset_dict)
    dummy_dataset.set_format("torch")
    return dummy_dataset


@pytest.mark.parametrize(
    "model_name,input_name", [("gpt2", "tensor"), ("gpt2", "text"), ("t5", "tensor"), ("t5", "text")]
)
def test_iterative_step_from_tensor(model_name, input_name, gpt2, t5, tmp_path):
    if input_name == "tensor":
        dummy_dataset = _init_tensor_dummy_dataset()
        inputs = {
            "input_ids": dummy_dataset["input_ids"],
            "attention_mask": dummy_dataset["attention_mask"],
            "labels": dummy_dataset["labels"],
        }
    else:
        dummy_dataset = _init_textual_dummy_dataset()
        inputs = {"texts": dummy_dataset["texts"], "texts_labels": dummy_dataset["texts_labels"]}
    model, tokenizer = gpt2 if model_name == "gpt2" else t5
    before = jax.tree_util.tree_map(np.asarray, model.params)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2)
    iterative_trainer = IterativeSFTTrainer(model=model, args=args, tokenizer=tokenizer)
    iterative_trainer.step(**inputs)

    # TRL: every parameter has a gradient; here: every parameter leaf was updated, in place
    assert iterative_trainer.model is model
    changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, np.asarray(b)), before, model.params)
    assert all(jax.tree_util.tree_leaves(changed)), changed
    model.params = jax.tree_util.tree_map(np.asarray, before)  # the next case starts from the same weights
