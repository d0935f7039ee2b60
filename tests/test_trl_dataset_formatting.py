"""TRL 0.7.11's tests/test_dataset_formatting.py on rljax (same cases and expected strings).

TRL's hub tokenizers are replaced by local ones: a BPE tokenizer with Llama 2's chat template
(``<s>``/``</s>``) and one with ChatML's; the hub-dataset case uses in-memory datasets of the
same layouts; setup_chat_format resizes a tiny untied Llama (embeddings and head) instead of
hf-internal-testing's Mistral.
"""
from typing import Callable

import jax
import numpy as np
import pytest
from datasets import Dataset

from rljax.data.formatting import get_formatting_func_from_dataset
from rljax.models.chat import ChatMlSpecialTokens, setup_chat_format

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are helpful"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi, how can I help you?"},
]
LLAMA_EXPECTED = "<s>[INST] <<SYS>>\nYou are helpful\n<</SYS>>\n\nHello [/INST] Hi, how can I help you? </s>"
CHATML_EXPECTED = ("<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                   "<|im_start|>assistant\nHi, how can I help you?<|im_end|>\n")


def _tokenizer(**kw):
    import sys
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import CORPUS

    from rljax.data import train_tokenizer

    return train_tokenizer(CORPUS * 4, vocab_size=320, **kw)


@pytest.fixture(scope="module")
def llama_tokenizer():
    tok = _tokenizer(bos_token="<s>", eos_token="</s>")
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tok = _tokenizer()
    tok.chat_template = ChatMlSpecialTokens().chat_template
    return tok


@pytest.mark.parametrize("field", ["messages", "conversations"])
def test_get_formatting_func_from_dataset_with_chatml(field, llama_tokenizer, chatml_tokenizer):
    dataset = Dataset.from_dict({field: [CONVERSATION]})
    for tokenizer, expected in ((llama_tokenizer, LLAMA_EXPECTED), (chatml_tokenizer, CHATML_EXPECTED)):
        formatting_func = get_formatting_func_from_dataset(dataset, tokenizer)
        assert isinstance(formatting_func, Callable)
        assert formatting_func(dataset[0]) == expected
        assert formatting_func(dataset[0:1]) == [expected]


def test_get_formatting_func_from_dataset_with_instruction(llama_tokenizer):
    dataset = Dataset.from_list([{"prompt": "What is 2+2?", "completion": "4"},
                                 {"prompt": "What is 3+3?", "completion": "6"}])
    formatting_func = get_formatting_func_from_dataset(dataset, llama_tokenizer)
    assert formatting_func is not None and isinstance(formatting_func, Callable)
    assert formatting_func(dataset[0]) == "<s>[INST] What is 2+2? [/INST] 4 </s>"
    assert formatting_func(dataset[0:1]) == ["<s>[INST] What is 2+2? [/INST] 4 </s>"]


def test_get_formatting_func_from_dataset_like_the_hub_ones(llama_tokenizer):
    # philschmid/trl-test-instruction (prompt/completion), dolly-15k-oai-style (messages),
    # guanaco-sharegpt-style (conversations of {"from", "value"}: not ChatML -> None)
    ds_1 = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    ds_2 = Dataset.from_dict({"messages": [CONVERSATION]})
    for ds in (ds_1, ds_2):
        formatting_func = get_formatting_func_from_dataset(ds, llama_tokenizer)
        assert formatting_func is not None and isinstance(formatting_func, Callable)
    ds_3 = Dataset.from_dict({"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]})
    assert get_formatting_func_from_dataset(ds_3, llama_tokenizer) is None


def test_get_formatting_func_from_dataset_with_unknown_format(llama_tokenizer):
    assert get_formatting_func_from_dataset(Dataset.from_dict({"text": ["test"]}), llama_tokenizer) is None


@pytest.fixture()
def model_and_tokenizer():
    from rljax.models import LlamaConfig, LlamaForCausalLM, init_params
    from rljax.models.auto import AutoModelForCausalLM

    tokenizer = _tokenizer(bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    module = LlamaForCausalLM(cfg)
    return AutoModelForCausalLM(module, init_params(module, jax.random.PRNGKey(0))), tokenizer


def test_setup_chat_format(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    original_tokenizer_len = len(tokenizer)
    assert original_tokenizer_len % 64 == 0  # as the Llama tokenizer's 32000 in TRL's test
    old = {k: np.asarray(v) for k, v in model.state_dict().items()}
    modified_model, modified_tokenizer = setup_chat_format(model, tokenizer, format="chatml", resize_to_multiple_of=64)
    _chatml = ChatMlSpecialTokens()
    assert modified_tokenizer.eos_token == "<|im_end|>" == _chatml.eos_token
    assert modified_tokenizer.pad_token == "<|im_end|>" == _chatml.pad_token
    assert modified_tokenizer.bos_token == "<|im_start|>" == _chatml.bos_token
    assert len(modified_tokenizer) == original_tokenizer_len + 2
    embed = np.asarray(model.get_parameter("model.embed_tokens.weight"))
    head = np.asarray(model.get_parameter("lm_head.weight"))
    assert embed.shape[0] % 64 == 0 and embed.shape[0] == original_tokenizer_len + 64
    assert head.shape[0] == original_tokenizer_len + 64 and model.config.vocab_size == original_tokenizer_len + 64
    np.testing.assert_array_equal(embed[:original_tokenizer_len], old["model.embed_tokens.weight"])
    np.testing.assert_allclose(embed[-1], old["model.embed_tokens.weight"].mean(0), rtol=1e-5, atol=1e-6)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the resized model runs on the new tokens
    ids = np.asarray([tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])])
    assert model(ids).logits.shape == (1, 2, original_tokenizer_len + 64)


def test_example_with_setup_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    modified_model, modified_tokenizer = setup_chat_format(model, tokenizer)
    assert modified_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML_EXPECTED
    assert modified_model.config.vocab_size == len(modified_tokenizer)  # no rounding asked
