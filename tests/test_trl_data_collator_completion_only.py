"""TRL 0.7.11's tests/test_data_collator_completion_only.py on rljax (same cases, texts and
expected strings).

Changes from TRL's file: imports; the session tokenizer (one token per character) instead of
the hub's GPT-2 tokenizer, with its pad token removed as GPT-2's has none (one example needs
no padding, so none is needed); NumPy instead of torch for the label selection. The
"template tokenized without context" slices ([1:] for the instruction, [2:] for the
response) are TRL's; with this tokenizer they drop the leading "\\n" (and "#").
"""
import copy

import numpy as np
import pytest

from rljax.data import DataCollatorForCompletionOnlyLM


@pytest.fixture()
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None  # GPT-2's tokenizer has no pad token
    return tok


def test_data_collator_finds_response_template_llama2_tokenizer(tokenizer):
    instruction = """### System: You are a helpful assistant.

### User: How much is 2+2?

### Assistant: 2+2 equals 4"""
    instruction_template = "\n### User:"
    response_template = "\n### Assistant:"

    # TRL: a template tokenized without its context differs from the in-context tokens; the
    # test passes the in-context ids (the template without its leading token(s)).
    tokenized_instruction_w_context = tokenizer.encode(instruction_template, add_special_tokens=False)[1:]
    tokenized_response_w_context = tokenizer.encode(response_template, add_special_tokens=False)[2:]

    # Plain check on string
    assert response_template in instruction
    tokenized_instruction = tokenizer.encode(instruction, add_special_tokens=False)

    # TRL's fix for #598: a response template given as (in-context) token ids
    collator = DataCollatorForCompletionOnlyLM(tokenized_response_w_context, tokenizer=tokenizer)
    collator.torch_call([tokenized_instruction])

    # TRL's PR #749: instruction and response templates both as token ids
    collator = DataCollatorForCompletionOnlyLM(
        tokenized_response_w_context, tokenized_instruction_w_context, tokenizer=tokenizer
    )
    collator.torch_call([tokenized_instruction])

    # TRL's PR #1185: the first user template differs from the rest
    instruction = """## User: First instruction

### Assistant: First response

### User: Second instruction

### Assistant: Second response"""
    tokenized_instruction = tokenizer.encode(instruction, add_special_tokens=False)
    collator = DataCollatorForCompletionOnlyLM(
        tokenized_response_w_context, tokenized_instruction_w_context, tokenizer=tokenizer
    )
    collator_output = collator.torch_call([tokenized_instruction])
    labels = collator_output["labels"]
    collator_text = tokenizer.decode(labels[np.where(labels != -100)])
    expected_text = " First response\n\n Second response" ""
    assert collator_text == expected_text


def test_data_collator_handling_of_long_sequences(tokenizer):
    instruction = """### System: You are a helpful assistant.

### User: How much is 2+2? I'm asking because I'm not sure. And I'm not sure because I'm not good at math.
"""
    response_template = "\n### Assistant:"
    # check DataCollatorForCompletionOnlyLM using response template only
    tokenized_instruction = tokenizer.encode(instruction, add_special_tokens=False)
    collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="Could not find response key"):
        encoded_instance = collator.torch_call([tokenized_instruction])
    result = np.all(encoded_instance["labels"] == -100)
    assert result, "Not all values in the tensor are -100."

    # check DataCollatorForCompletionOnlyLM using response template and instruction template
    instruction_template = "\n### User:"
    collator = DataCollatorForCompletionOnlyLM(response_template, instruction_template, tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="Could not find response key"):
        encoded_instance = collator.torch_call([tokenized_instruction])
    result = np.all(encoded_instance["labels"] == -100)
    assert result, "Not all values in the tensor are -100."
