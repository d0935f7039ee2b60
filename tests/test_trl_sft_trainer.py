"""TRL 0.7.11's tests/test_sft_trainer.py on rljax: the same cases, datasets, arguments and
assertions, with imports changed.

Other changes from TRL's file:
* a tiny local GPT-2 (2 layers, 32 wide) and the session tokenizer (one token per character)
  instead of the hub's dummy GPT-2; ``model_id`` is that model saved to a local directory.
  The tokenizer gets transformers 4.38's default GPT-2 chat template (recent transformers
  have no default template) so the chat/instruction datasets format as they did in TRL.
* counts that depend on GPT-2's tokenization are computed from ours: the number of packed
  rows (hence the step of the epoch checkpoint in ``..._infinite_with_model_epochs``).
* ``test_data_collator_completion_lm`` pads one example with ``pad_to_multiple_of=1`` (TRL's
  exact width): rljax pads to bucketed widths, and the test reads the text after the last -100.
* NEFTune: TRL checks its torch forward hook on the embedding module; rljax adds the noise in
  the loss function, so the test reads the embeddings through ``rljax.sft.input_embeddings``.
* PEFT cases use ``rljax.models.peft`` (``LoraConfig``, ``PeftModel``); TRL's NEFTune hook checks
  become the ``input_embeddings`` reads above; test_peft_sft_trainer_gc is a parameter of
  test_peft_sft_trainer.
"""
import copy
import os

import jax
import numpy as np
import pytest
from datasets import Dataset

from rljax import TrainingArguments
from rljax.data import ConstantLengthDataset, DataCollatorForCompletionOnlyLM
from rljax.models import AutoModelForCausalLM
from rljax.models.gpt2 import GPT2Config
from rljax.sft import input_embeddings
from rljax.trainers.sft import SFTTrainer

# transformers 4.38's GPT2Tokenizer.default_chat_template, used by TRL 0.7.11's tests
GPT2_DEFAULT_CHAT_TEMPLATE = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"


def formatting_prompts_func(example):
    text = f"### Question: {example['question']}\n ### Answer: {example['answer']}"
    return text


def formatting_prompts_func_batched(example):
    output_text = []
    for i, question in enumerate(example["question"]):
        text = f"### Question: {question}\n ### Answer: {example['answer'][i]}"
        output_text.append(text)
    return output_text


DUMMY = {
    "question": [
        "Does llamas know how to code?",
        "Does llamas know how to fly?",
        "Does llamas know how to talk?",
        "Does llamas know how to code?",
        "Does llamas know how to fly?",
        "Does llamas know how to talk?",
        "Does llamas know how to swim?",
    ],
    "answer": [
        "Yes, llamas are very good at coding.",
        "No, llamas can't fly.",
        "Yes, llamas are very good at talking.",
        "Yes, llamas are very good at coding.",
        "No, llamas can't fly.",
        "Yes, llamas are very good at talking.",
        "No, llamas can't swim.",
    ],
    "text": [
        "### Question: Does llamas know how to code?\n ### Answer: Yes, llamas are very good at coding.",
        "### Question: Does llamas know how to fly?\n ### Answer: No, llamas can't fly.",
        "### Question: Does llamas know how to talk?\n ### Answer: Yes, llamas are very good at talking.",
        "### Question: Does llamas know how to code?\n ### Answer: Yes, llamas are very good at coding.",
        "### Question: Does llamas know how to fly?\n ### Answer: No, llamas can't fly.",
        "### Question: Does llamas know how to talk?\n ### Answer: Yes, llamas are very good at talking.",
        "### Question: Does llamas know how to swim?\n ### Answer: No, llamas can't swim.",
    ],
}
CHATML = {
    "messages": [
        [
            {"role": "system", "content": "You are helpful"},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi, how can I help you?"},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "What is 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        [
            {"role": "system", "content": "You are helpful"},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi, how can I help you?"},
        ],
    ]
}
INSTRUCTION = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "What is 3+3?", "completion": "6"},
    {"prompt": "What is 4+4?", "completion": "8"},
] * 4


class Ctx:
    """What TRL's setUpClass builds."""


@pytest.fixture(scope="module")
def ctx(tiny_tokenizer, tmp_path_factory):
    c = Ctx()
    c.tokenizer = copy.deepcopy(tiny_tokenizer)
    c.tokenizer.pad_token = c.tokenizer.eos_token  # as TRL's setUpClass
    c.tokenizer.chat_template = GPT2_DEFAULT_CHAT_TEMPLATE
    cfg = GPT2Config(vocab_size=len(c.tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=c.tokenizer.bos_token_id, eos_token_id=c.tokenizer.eos_token_id)
    c.model = AutoModelForCausalLM.from_config(cfg, rng=jax.random.PRNGKey(0))
    c.model_id = str(tmp_path_factory.mktemp("dummy-gpt2"))
    c.model.save_pretrained(c.model_id)
    c.tokenizer.save_pretrained(c.model_id)
    c.dummy_dataset = Dataset.from_dict(DUMMY)
    c.dummy_chatml_dataset = Dataset.from_dict(CHATML)
    c.dummy_instruction_dataset = Dataset.from_list(INSTRUCTION)
    c.train_dataset = ConstantLengthDataset(
        c.tokenizer, c.dummy_dataset, dataset_text_field=None, formatting_func=formatting_prompts_func,
        seq_length=16, num_of_sequences=16,
    )
    c.eval_dataset = ConstantLengthDataset(
        c.tokenizer, c.dummy_dataset, dataset_text_field=None, formatting_func=formatting_prompts_func,
        seq_length=16, num_of_sequences=16,
    )
    return c


def args_(tmp_dir, **kw):
    base = dict(output_dir=str(tmp_dir), dataloader_drop_last=True, per_device_train_batch_size=2, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_constant_length_dataset(ctx):
    formatted_dataset = ConstantLengthDataset(
        ctx.tokenizer, ctx.dummy_dataset, dataset_text_field=None, formatting_func=formatting_prompts_func,
    )
    assert len(formatted_dataset) == len(ctx.dummy_dataset)
    assert len(formatted_dataset) > 0

    for example in formatted_dataset:
        assert "input_ids" in example
        assert "labels" in example
        assert len(example["input_ids"]) == formatted_dataset.seq_length
        assert len(example["labels"]) == formatted_dataset.seq_length
        decoded_text = ctx.tokenizer.decode(example["input_ids"])
        assert ("Question" in decoded_text) and ("Answer" in decoded_text)


def test_sft_trainer(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=4, eval_steps=2, save_steps=2)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, packing=True)
    trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    assert trainer.state.log_history[0]["eval_loss"] is not None
    assert "model.safetensors" in os.listdir(str(tmp_path / "checkpoint-2"))


def test_sft_trainer_uncorrect_data(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=2, eval_steps=1, save_steps=1)
    m, tok = ctx.model, ctx.tokenizer

    with pytest.raises(ValueError):
        SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_dataset, packing=True, tokenizer=tok)
    # this should work since the dummy chatml include the correct format
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_chatml_dataset, max_seq_length=32,
               num_of_sequences=32, packing=True, tokenizer=tok)
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_chatml_dataset, packing=False, tokenizer=tok)
    # this should work since the dummy instruction dataset is the correct format
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_instruction_dataset, max_seq_length=16,
               packing=True, tokenizer=tok)
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_instruction_dataset, packing=False, tokenizer=tok)
    # This should work
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_dataset, formatting_func=formatting_prompts_func,
               max_seq_length=32, packing=True, tokenizer=tok)

    with pytest.raises(ValueError):
        # This should not work because not enough data for one sample
        SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_dataset,
                   formatting_func=formatting_prompts_func, max_seq_length=1024, packing=True, tokenizer=tok)
    # This should not work as well
    with pytest.raises(ValueError):
        SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_dataset,
                   formatting_func=formatting_prompts_func, packing=False, tokenizer=tok)
    # but this should work
    SFTTrainer(model=m, args=training_args, train_dataset=ctx.dummy_dataset,
               formatting_func=formatting_prompts_func_batched, packing=False, tokenizer=tok)


def _train_and_check(trainer, tmp_path, checkpoint, eval_logged=False):
    trainer.train()
    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    if eval_logged:
        assert trainer.state.log_history[0]["eval_loss"] is not None
    assert "model.safetensors" in os.listdir(str(tmp_path / checkpoint))


def test_sft_trainer_with_model_num_train_epochs(ctx, tmp_path):
    kw = dict(evaluation_strategy="steps", max_steps=2, save_steps=1, num_train_epochs=2)
    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "a", eval_steps=1, **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.train_dataset, eval_dataset=ctx.eval_dataset, packing=True)
    _train_and_check(trainer, tmp_path / "a", "checkpoint-2", eval_logged=True)

    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "b", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, dataset_text_field="text", max_seq_length=16,
                         num_of_sequences=16, packing=True)
    _train_and_check(trainer, tmp_path / "b", "checkpoint-2")

    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "c", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, dataset_text_field="text", max_seq_length=16)
    _train_and_check(trainer, tmp_path / "c", "checkpoint-1")


def test_sft_trainer_with_model(ctx, tmp_path):
    kw = dict(evaluation_strategy="steps", max_steps=2, save_steps=1)
    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "a", eval_steps=1, **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.train_dataset, eval_dataset=ctx.eval_dataset, packing=True)
    _train_and_check(trainer, tmp_path / "a", "checkpoint-2", eval_logged=True)

    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "b", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, dataset_text_field="text", max_seq_length=16,
                         num_of_sequences=16, packing=True)
    _train_and_check(trainer, tmp_path / "b", "checkpoint-2")

    # with formatting_func + packed
    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "c", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, formatting_func=formatting_prompts_func,
                         max_seq_length=16, num_of_sequences=16, packing=True)
    _train_and_check(trainer, tmp_path / "c", "checkpoint-2")

    # with formatting_func + packed
    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "d", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, formatting_func=formatting_prompts_func_batched,
                         max_seq_length=16)
    _train_and_check(trainer, tmp_path / "d", "checkpoint-2")

    trainer = SFTTrainer(model=ctx.model, args=args_(tmp_path / "e", **kw), tokenizer=ctx.tokenizer,
                         train_dataset=ctx.dummy_dataset, dataset_text_field="text", max_seq_length=16)
    _train_and_check(trainer, tmp_path / "e", "checkpoint-1")


def test_sft_trainer_with_multiple_eval_datasets(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=1, eval_steps=1, save_steps=1)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset={"data1": ctx.eval_dataset, "data2": ctx.eval_dataset}, packing=True)
    trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    assert trainer.state.log_history[0]["eval_data1_loss"] is not None
    assert trainer.state.log_history[1]["eval_data2_loss"] is not None
    assert "model.safetensors" in os.listdir(str(tmp_path / "checkpoint-1"))


def test_data_collator_completion_lm(ctx):
    response_template = "### Response:\n"
    # pad_to_multiple_of=1: TRL's exact width (rljax pads to buckets by default)
    data_collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=ctx.tokenizer, mlm=False,
                                                    pad_to_multiple_of=1)
    text = """\n\n### Instructions:\nHello all this should be masked\n\n### Response:\nI have not been masked correctly."""
    encoded_text = ctx.tokenizer(text)
    examples = [encoded_text]

    batch = data_collator(examples)
    labels = batch["labels"]
    last_pad_idx = np.where(labels == -100)[1][-1]
    result_text = ctx.tokenizer.decode(batch["input_ids"][0, last_pad_idx + 1 :])
    assert result_text == "I have not been masked correctly."


def test_data_collator_completion_lm_with_multiple_text(ctx):
    tokenizer = copy.deepcopy(ctx.tokenizer)
    tokenizer.padding_side = "left"
    response_template = "### Response:\n"
    data_collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=tokenizer, mlm=False)

    text1 = """\n\n### Instructions:\nHello all this should be masked\n\n### Response:\nI have not been masked correctly."""
    text2 = """\n\n### Instructions:\nThis is another longer text that should also be masked. This text is significantly longer than the previous one.\n\n### Response:\nI have not been masked correctly."""
    examples = [tokenizer(text1), tokenizer(text2)]

    batch = data_collator(examples)
    for i in range(2):
        labels = batch["labels"][i]
        last_pad_idx = np.where(labels == -100)[0][-1]
        result_text = tokenizer.decode(batch["input_ids"][i, last_pad_idx + 1 :])
        assert result_text == "I have not been masked correctly."


def test_data_collator_chat_completion_lm(ctx):
    instruction_template = "### Human:"
    assistant_template = "### Assistant:"
    data_collator = DataCollatorForCompletionOnlyLM(
        response_template=assistant_template, instruction_template=instruction_template,
        tokenizer=ctx.tokenizer, mlm=False,
    )
    text = """### Human: Hello all this should be masked.### Assistant: I should not be masked.### Human: All this should be masked too.### Assistant: I should not be masked too."""
    examples = [ctx.tokenizer(text)]

    batch = data_collator(examples)
    labels = batch["labels"]
    non_masked_tokens = batch["input_ids"][labels != -100]
    result_text = ctx.tokenizer.decode(non_masked_tokens)
    assert result_text == " I should not be masked. I should not be masked too."


def test_data_collator_chat_completion_lm_with_multiple_text(ctx):
    tokenizer = copy.deepcopy(ctx.tokenizer)
    tokenizer.padding_side = "left"
    data_collator = DataCollatorForCompletionOnlyLM(
        response_template="### Assistant:", instruction_template="### Human:", tokenizer=tokenizer, mlm=False,
    )
    text1 = """### Human: Hello all this should be masked.### Assistant: I should not be masked."""
    text2 = """### Human: Hello all this should be masked.### Assistant: I should not be masked.### Human: All this should be masked too.### Assistant: I should not be masked too."""
    examples = [tokenizer(text1), tokenizer(text2)]

    batch = data_collator(examples)
    labels = batch["labels"]
    input_ids = batch["input_ids"]
    result_text1 = tokenizer.decode(input_ids[0][labels[0] != -100])
    assert result_text1 == " I should not be masked."
    result_text2 = tokenizer.decode(input_ids[1][labels[1] != -100])
    assert result_text2 == " I should not be masked. I should not be masked too."


def test_sft_trainer_infinite_with_model(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=5, eval_steps=1, save_steps=1)
    trainer = SFTTrainer(model=ctx.model, args=training_args, tokenizer=ctx.tokenizer, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, packing=True, max_seq_length=500)
    assert trainer.train_dataset.infinite

    trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    assert trainer.state.log_history[0]["eval_loss"] is not None
    # make sure the trainer did 5 steps
    assert "model.safetensors" in os.listdir(str(tmp_path / "checkpoint-5"))


def test_sft_trainer_infinite_with_model_epochs(ctx, tmp_path):
    training_args = args_(tmp_path, num_train_epochs=1, save_strategy="epoch")
    trainer = SFTTrainer(model=ctx.model, args=training_args, tokenizer=ctx.tokenizer, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, packing=True, max_seq_length=500)
    assert not trainer.train_dataset.infinite

    trainer.train()

    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    # one epoch over the packed rows (TRL: 4 steps with GPT-2's tokenizer; more rows here)
    steps = len(trainer.train_dataset) // 2
    assert "model.safetensors" in os.listdir(str(tmp_path / f"checkpoint-{steps}"))


def test_sft_trainer_with_model_neftune(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=2, eval_steps=1, save_steps=1)
    trainer = SFTTrainer(model=ctx.model, args=training_args, tokenizer=ctx.tokenizer, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, neftune_noise_alpha=5, packing=True)
    ids = np.asarray([[1, 0, 1]])

    def embeds(seed):  # what the training forward sees (TRL: the hooked embedding in train mode)
        return input_embeddings(trainer.module, trainer.params, ids, neftune_noise_alpha=trainer.neftune_noise_alpha,
                                rng=jax.random.PRNGKey(seed))

    embeds_neftune, embeds_neftune_2 = embeds(42), embeds(24)
    assert not np.allclose(embeds_neftune, embeds_neftune_2)

    trainer.train()

    # Make sure forward pass works fine, and without noise outside training
    _ = trainer.model(ids)
    clean = input_embeddings(trainer.module, trainer.params, ids)
    np.testing.assert_array_equal(clean, input_embeddings(trainer.module, trainer.params, ids))


def _lora_config():
    from rljax.models.peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")


def _check_adapter_checkpoint(trainer, tmp_dir):
    assert trainer.state.log_history[(-1)]["train_loss"] is not None
    assert trainer.state.log_history[0]["eval_loss"] is not None

    assert "adapter_model.safetensors" in os.listdir(os.path.join(tmp_dir, "checkpoint-2"))
    assert "adapter_config.json" in os.listdir(os.path.join(tmp_dir, "checkpoint-2"))
    assert "model.safetensors" not in os.listdir(os.path.join(tmp_dir, "checkpoint-2"))


def test_peft_sft_trainer_str(ctx):
    _ = SFTTrainer(model=ctx.model_id, args=None, train_dataset=ctx.train_dataset, eval_dataset=ctx.eval_dataset,
                   peft_config=_lora_config(), packing=True)


@pytest.mark.slow
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["test_peft_sft_trainer", "test_peft_sft_trainer_gc"])
def test_peft_sft_trainer(ctx, tmp_path, gradient_checkpointing):
    from rljax.models.peft import PeftModel

    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=4, eval_steps=2, save_steps=2,
                          gradient_checkpointing=gradient_checkpointing)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, peft_config=_lora_config(), packing=True)

    assert isinstance(trainer.model, PeftModel)

    trainer.train()

    _check_adapter_checkpoint(trainer, tmp_path)


@pytest.mark.slow
def test_peft_sft_trainer_neftune(ctx, tmp_path):
    from rljax.models.peft import PeftModel

    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=4, eval_steps=2, save_steps=2)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, peft_config=_lora_config(), neftune_noise_alpha=5, packing=True)

    assert isinstance(trainer.model, PeftModel)
    ids = np.asarray([[1, 0, 1]])

    def embeds(seed):  # what the training forward sees (TRL: the hooked embedding in train mode)
        return input_embeddings(trainer.module, trainer.params, ids, neftune_noise_alpha=trainer.neftune_noise_alpha,
                                rng=jax.random.PRNGKey(seed))

    assert not np.allclose(embeds(42), embeds(24))

    trainer.train()

    _check_adapter_checkpoint(trainer, tmp_path)
    # Make sure forward pass works fine, and without noise outside training
    clean = input_embeddings(trainer.module, trainer.params, ids)
    np.testing.assert_array_equal(clean, input_embeddings(trainer.module, trainer.params, ids))


def test_peft_sft_trainer_tag(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=4, eval_steps=2, save_steps=2,
                          gradient_checkpointing=True)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, peft_config=_lora_config(), packing=True)

    assert trainer.model.model_tags == trainer._tag_names


def test_sft_trainer_tag(ctx, tmp_path):
    training_args = args_(tmp_path, evaluation_strategy="steps", max_steps=4, eval_steps=2, save_steps=2,
                          gradient_checkpointing=True)
    trainer = SFTTrainer(model=ctx.model_id, args=training_args, train_dataset=ctx.train_dataset,
                         eval_dataset=ctx.eval_dataset, packing=True)
    assert trainer.model.model_tags == trainer._tag_names


def test_invalid_peft_config_is_rejected_with_the_fix(ctx, tmp_path):
    with pytest.raises(ValueError, match="use_dora=True"):
        SFTTrainer(model=ctx.model, args=args_(tmp_path), tokenizer=ctx.tokenizer, train_dataset=ctx.train_dataset,
                   packing=True, peft_config={"r": 16, "use_dora": True})
