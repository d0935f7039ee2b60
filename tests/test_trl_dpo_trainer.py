"""TRL 0.7.11's tests/test_dpo_trainer.py on rljax: same cases, same dataset and arguments,
with tiny local models (a 2-layer GPT-2 and a 2-layer Llama saved in tmp dirs) instead of
``trl-internal-testing/dummy-GPT2-correct-vocab`` / ``HuggingFaceM4/tiny-random-LlamaForCausalLM``.

The T5 cases run on a tiny random rljax T5 (``AutoModelForSeq2SeqLM``, vocabulary of the session
tokenizer, which here appends eos like T5's) instead of
``trl-internal-testing/tiny-T5ForConditionalGeneration-correct-vocab``. The PEFT/LoRA cases run on
``rljax.models.peft``; those that need what rljax refuses (4-bit loading without adapters, a PeftModel
plus peft_config, ``generate_during_eval``) are skipped with that reason. ``generate_during_eval=True`` is refused whether or not wandb is installed (README,
"Deliberate differences"). Parameters are compared as pytrees (no ``named_parameters``).
"""
import copy
import re

import jax
import numpy as np
import pytest
from datasets import Dataset

from rljax.models import AutoModelForCausalLM, init_params, model_from_config, save_pretrained
from rljax.models.gpt2 import GPT2Config
from rljax.models.llama import LlamaConfig
from rljax.trainers.base import TrainingArguments
from rljax.trainers.dpo import DPOTrainer



def _save_tiny(cfg, tmp_path_factory, name):
    module = model_from_config(cfg)
    path = str(tmp_path_factory.mktemp(name))
    save_pretrained(module, init_params(module, jax.random.PRNGKey(0)), path)
    return path


@pytest.fixture(scope="module")
def model_id(tiny_tokenizer, tmp_path_factory):
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return _save_tiny(cfg, tmp_path_factory, "dummy-gpt2")


@pytest.fixture(scope="module")
def llama_id(tiny_tokenizer, tmp_path_factory):
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return _save_tiny(cfg, tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="module")
def t5_tokenizer(tiny_tokenizer):
    from _t5_fixtures import t5_like_tokenizer

    return t5_like_tokenizer(tiny_tokenizer)


@pytest.fixture()
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the session tokenizer stays untouched
    tok.pad_token = tok.eos_token  # as TRL's setUpClass
    return tok


def _init_dummy_dataset():
    # fmt: off
    dummy_dataset_dict = {
        "prompt": [
            "hello",
            "how are you",
            "What is your name?",
            "What is your name?",
            "Which is the best programming language?",
            "Which is the best programming language?",
            "Which is the best programming language?",
            "[INST] How is the stock price? [/INST]",
            "[INST] How is the stock price? [/INST] ",
        ],
        "chosen": [
            "hi nice to meet you",
            "I am fine",
            "My name is Mary",
            "My name is Mary",
            "Python",
            "Python",
            "Python",
            "$46 as of 10am EST",
            "46 as of 10am EST",
        ],
        "rejected": [
            "leave me alone",
            "I am not fine",
            "Whats it to you?",
            "I dont have a name",
            "Javascript",
            "C++",
            "Java",
            " $46 as of 10am EST",
            " 46 as of 10am EST",
        ],
    }
    # fmt: on
    return Dataset.from_dict(dummy_dataset_dict)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, remove_unused_columns=False,
                gradient_accumulation_steps=1, learning_rate=9e-1, evaluation_strategy="steps", disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _leaves(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _assert_params_changed(before, model):
    after = _leaves(model.params)
    for n, param in before.items():
        if param.sum() != 0:  # ignore 0 biases
            assert not np.array_equal(param, after[n]), n


@pytest.mark.parametrize(
    "name, loss_type, pre_compute",
    [
        ("gpt2", "sigmoid", True),
        pytest.param("t5", "hinge", False, marks=pytest.mark.slow),
        ("gpt2", "ipo", False),
        pytest.param("t5", "ipo", True, marks=pytest.mark.slow),
        ("gpt2", "kto_pair", True),
        pytest.param("t5", "kto_pair", False, marks=pytest.mark.slow),
    ],
)
def test_dpo_trainer(model_id, tokenizer, t5_tokenizer, tmp_path, name, loss_type, pre_compute):
    if name == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(model_id)
        ref_model = AutoModelForCausalLM.from_pretrained(model_id)
    else:
        from _t5_fixtures import tiny_t5

        model, ref_model = tiny_t5(len(t5_tokenizer)), tiny_t5(len(t5_tokenizer))
        tokenizer = t5_tokenizer
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, beta=0.1, loss_type=loss_type, args=_args(tmp_path), tokenizer=tokenizer,
        train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(), precompute_ref_log_probs=pre_compute,
    )
    previous_trainable_params = _leaves(trainer.model.params)
    assert trainer.is_encoder_decoder == (name == "t5")

    trainer.train()

    assert trainer.state.log_history[-1]["train_loss"] is not None
    _assert_params_changed(previous_trainable_params, trainer.model)


def test_dpo_trainer_without_providing_ref_model(model_id, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_id)
    trainer = DPOTrainer(
        model=model, ref_model=None, beta=0.1, args=_args(tmp_path, gradient_accumulation_steps=4), tokenizer=tokenizer,
        train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(), precompute_ref_log_probs=True,
    )
    previous_trainable_params = _leaves(trainer.model.params)

    trainer.train()

    assert trainer.state.log_history[-1]["train_loss"] is not None
    _assert_params_changed(previous_trainable_params, trainer.model)


def _lora_config():
    from rljax.models.peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")


@pytest.mark.slow
def test_dpo_trainer_without_providing_ref_model_with_lora(model_id, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_id)
    trainer = DPOTrainer(
        model=model, ref_model=None, beta=0.1, args=_args(tmp_path, gradient_accumulation_steps=4), tokenizer=tokenizer,
        train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(), peft_config=_lora_config(),
        precompute_ref_log_probs=True,
    )
    previous_trainable_params = _leaves(trainer.model.params)

    trainer.train()

    assert trainer.state.log_history[-1]["train_loss"] is not None
    # check the params have changed - ignore 0 biases
    after = _leaves(trainer.model.params)
    lora = {n: p for n, p in previous_trainable_params.items() if "lora" in n}
    assert lora
    for n, param in lora.items():
        if param.sum() != 0:
            assert not np.array_equal(param, after[n]), n


PAD_TOKEN_REGEX = (
    r"Padding is enabled, but the tokenizer is not configured with a padding token."
    r" Explicitly set `tokenizer.pad_token` \(e.g. `tokenizer.pad_token = tokenizer.eos_token`\)"
    r" before calling the trainer."
)


@pytest.mark.parametrize("extra", [{}, {"dataset_num_proc": 5}], ids=["padding_token_is_none", "w_dataset_num_proc"])
def test_dpo_trainer_padding_token_is_none(model_id, tiny_tokenizer, tmp_path, extra):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=PAD_TOKEN_REGEX):
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_id), ref_model=None, beta=0.1, args=_args(tmp_path),
            tokenizer=tokenizer, train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(), **extra,
        )
        trainer.train()


def test_dpo_trainer_generate_during_eval_no_wandb(model_id, tokenizer, tmp_path):
    # TRL raises only without wandb ("`generate_during_eval=True` requires Weights and Biases ..."); rljax
    # never logs sample generations to W&B, so the flag is refused either way.
    with pytest.raises(ValueError, match=re.escape("generate_during_eval=True")):
        DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_id), ref_model=None, beta=0.1, args=_args(tmp_path),
            tokenizer=tokenizer, train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(),
            generate_during_eval=True,
        )


@pytest.mark.skip(reason="a PeftModel plus peft_config: TRL merges the adapter and adds a fresh one, rljax's "
                         "DPOTrainer refuses the pair (rljax.trainers.base.apply_peft); and "
                         "AutoModelForCausalLM.from_pretrained(<adapter dir>) is not supported yet")
def test_dpo_lora_save():
    pass


@pytest.mark.skip(reason="AutoModelForCausalLM.from_pretrained(load_in_4bit=True) without adapters is refused "
                         "(quantize under LoRA: AutoModelForCausalLMWithValueHead / trainers' peft_config), and "
                         "generate_during_eval=True is refused (README)")
def test_dpo_lora_bf16_autocast_llama():
    pass


@pytest.mark.skip(reason="TRL skips it too: needs a GPU with bf16 (and bitsandbytes' load_in_4bit)")
def test_dpo_lora_bf16_autocast():
    pass


def test_dpo_lora_tags(llama_id, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_id)
    trainer = DPOTrainer(
        model=model, ref_model=None, beta=0.1, args=_args(tmp_path, gradient_accumulation_steps=4), tokenizer=tokenizer,
        train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(), peft_config=_lora_config(),
    )
    assert trainer.model.model_tags == trainer._tag_names


def test_dpo_tags(llama_id, tokenizer, tmp_path):
    # TRL marks this one require_peft although it uses no adapter; it runs here.
    model = AutoModelForCausalLM.from_pretrained(llama_id)
    trainer = DPOTrainer(
        model=model, ref_model=None, beta=0.1, args=_args(tmp_path, gradient_accumulation_steps=4), tokenizer=tokenizer,
        train_dataset=_init_dummy_dataset(), eval_dataset=_init_dummy_dataset(),
    )
    assert trainer.model.model_tags == trainer._tag_names


# rljax additions: the encoder-decoder tokenization and errors

def test_t5_tokenize_row_follows_trl_encoder_decoder_path(t5_tokenizer, tmp_path):
    from _t5_fixtures import tiny_t5

    model = tiny_t5(len(t5_tokenizer))
    with pytest.warns(UserWarning, match="max_target_length"):
        trainer = DPOTrainer(model=model, ref_model=None, args=_args(tmp_path), tokenizer=t5_tokenizer,
                             max_length=64, max_prompt_length=4)
    assert trainer.args.max_target_length == 128
    row = {"prompt": "What is your name?", "chosen": "My name is Mary", "rejected": "Whats it to you?"}
    toks = trainer.tokenize_row(row)
    eos = t5_tokenizer.eos_token_id
    assert toks["prompt_input_ids"] == t5_tokenizer(row["prompt"], truncation=True, max_length=4)["input_ids"]
    assert len(toks["prompt_input_ids"]) == 4 and toks["prompt_input_ids"][-1] == eos  # cut, eos kept (as HF)
    assert toks["chosen_labels"] == t5_tokenizer(row["chosen"])["input_ids"] and toks["chosen_labels"][-1] == eos
    assert "chosen_input_ids" not in toks
    with_model = trainer.tokenize_row(row, model=model)  # TRL adds decoder inputs when given the model
    assert with_model["chosen_decoder_input_ids"] == [0] + toks["chosen_labels"][:-1]
    batch = trainer.collate([toks, trainer.tokenize_row(dict(row, chosen="Mary"))])
    assert batch["chosen_labels"].shape == batch["rejected_labels"].shape
    assert (batch["prompt_attention_mask"][:, 0] == 1).all()  # right-padded, as TRL's collator
    with pytest.raises(ValueError, match="is_encoder_decoder=False contradicts"):
        DPOTrainer(model=model, ref_model=None, args=_args(tmp_path), tokenizer=t5_tokenizer, is_encoder_decoder=False,
                   max_length=64, max_prompt_length=4, max_target_length=8)
