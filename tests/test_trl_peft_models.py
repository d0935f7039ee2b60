"""Port of TRL 0.7.11 ``tests/test_peft_models.py`` onto rljax.

Same cases, same LoraConfig (r=16, alpha 32, dropout 0.05, CAUSAL_LM) and the same expected
counts. TRL's hub checkpoint "trl-internal-testing/tiny-random-GPTNeoXForCausalLM" is rebuilt
locally with its shape (hidden 32, 5 layers, 4 heads, intermediate 37, vocab 1024), so TRL's
numbers hold as they are: 10273 trainable params with LoRA (5 x query_key_value adapters of
rank 16 + the 33-param value head), 99578 without.

Changes beyond imports: ``peft``'s ``get_peft_model``/``LoraConfig`` are rljax's
(``rljax.models.peft``); "trainable" (torch's ``requires_grad``) is
``rljax.models.peft.trainable_mask``, which the trainers differentiate; ``torch.allclose`` over
``named_parameters`` -> ``np.array_equal`` over the params trees. The value head of a PEFT
model is saved in ``model.safetensors`` (rljax writes safetensors only; TRL: ``pytorch_model.bin``).
bitsandbytes' ``Linear8bitLt`` is rljax's int8 ``QuantizedArray`` kernel (``rljax.models.quant``);
``AutoModelForCausalLM.from_pretrained(..., load_in_8bit=True)`` without adapters is refused
(a quantized base only trains under LoRA), so the second half of the bnb case quantizes at the
value-head model's ``from_pretrained`` instead.
"""
import os
import tempfile

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from rljax.models.auto import AutoModelForCausalLM, AutoModelForCausalLMWithValueHead
from rljax.models.peft import LoraConfig, get_peft_model, trainable_mask
from rljax.models.quant import is_quantized


@pytest.fixture(scope="module")
def causal_lm_model_id(tmp_path_factory):
    """tiny-random-GPTNeoXForCausalLM's shape, written by transformers."""
    torch = pytest.importorskip("torch")
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=512, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("trl_peft") / "tiny-random-GPTNeoXForCausalLM")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture
def lora_config():
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")


def nb_trainable_params(model) -> int:
    """TRL's ``sum(p.numel() for p in model.parameters() if p.requires_grad)``."""
    if not model.is_peft_model:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model.params))
    mask = trainable_mask(model.params, model.lora_config)
    return sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(model.params),
                                                     jax.tree_util.tree_leaves(mask)) if m)


def assert_same_params(a, b, skip=()):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert set(fa) == set(fb)
    for k in fa:
        if k[0] not in skip:
            assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), "/".join(k)


def test_create_peft_model(causal_lm_model_id, lora_config):
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    _ = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model)


def test_peft_requires_grad(causal_lm_model_id, lora_config):
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model)

    # Check that the value head has requires_grad=True
    mask = trainable_mask(model.params, model.lora_config)
    assert mask["v_head"]["summary"]["kernel"]


def test_check_peft_model_nb_trainable_params(causal_lm_model_id, lora_config):
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model)

    # Check that the number of trainable parameters is correct
    assert nb_trainable_params(model) == 10273

    # Check that the number of trainable param for the non-peft model is correct
    non_peft_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model_id)
    assert nb_trainable_params(non_peft_model) == 99578


def test_create_peft_model_from_config(causal_lm_model_id, lora_config):
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model_id, peft_config=lora_config)
    # Check that the number of trainable parameters is correct
    assert nb_trainable_params(trl_model) == 10273

    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model, peft_config=lora_config)
    # Check that the number of trainable parameters is correct
    assert nb_trainable_params(trl_model) == 10273


def test_create_bnb_peft_model_from_config(causal_lm_model_id, lora_config):
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(
        causal_lm_model_id, peft_config=lora_config, load_in_8bit=True
    )
    # Check that the number of trainable parameters is correct
    assert nb_trainable_params(trl_model) == 10273
    assert is_quantized(trl_model.params["gpt_neox"]["layers_0"]["mlp"]["dense_h_to_4h"]["kernel"])

    with pytest.raises(ValueError, match="load_in_8bit"):  # rljax: no quantized base without adapters
        AutoModelForCausalLM.from_pretrained(causal_lm_model_id, load_in_8bit=True, device_map="auto")
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(causal_lm_model, peft_config=lora_config,
                                                                  load_in_8bit=True)
    # Check that the number of trainable parameters is correct
    assert nb_trainable_params(trl_model) == 10273
    assert is_quantized(trl_model.params["gpt_neox"]["layers_0"]["mlp"]["dense_h_to_4h"]["kernel"])


def test_save_pretrained_peft(causal_lm_model_id, lora_config):
    from safetensors.numpy import load_file

    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model)

    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir)

        # check that the files `adapter_model.safetensors` and `adapter_config.json` are in the directory
        assert os.path.isfile(f"{tmp_dir}/adapter_model.safetensors"), f"{tmp_dir}/adapter_model.safetensors does not exist"
        assert os.path.exists(f"{tmp_dir}/adapter_config.json"), f"{tmp_dir}/adapter_config.json does not exist"
        # check also for `model.safetensors` (TRL: `pytorch_model.bin`) and make sure it only contains `v_head` weights
        assert os.path.exists(f"{tmp_dir}/model.safetensors"), f"{tmp_dir}/model.safetensors does not exist"
        maybe_v_head = load_file(f"{tmp_dir}/model.safetensors")
        # check that only keys that starts with `v_head` are in the dict
        assert all(k.startswith("v_head") for k in maybe_v_head), (
            f"keys in {tmp_dir}/model.safetensors do not start with `v_head`"
        )

        model_from_pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_dir)

        # check all the weights are the same
        assert_same_params(model.params, model_from_pretrained.params)


def test_load_pretrained_peft(causal_lm_model_id, lora_config):
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model)

    with tempfile.TemporaryDirectory() as tmp_dir:
        pretrained_model.save_pretrained(tmp_dir)
        model_from_pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_dir)

        # check that the files `adapter_model.safetensors` and `adapter_config.json` are in the directory
        assert os.path.isfile(f"{tmp_dir}/adapter_model.safetensors"), f"{tmp_dir}/adapter_model.safetensors does not exist"
        assert os.path.exists(f"{tmp_dir}/adapter_config.json"), f"{tmp_dir}/adapter_config.json does not exist"

        # check all the weights are the same
        assert_same_params(model.params, model_from_pretrained.params, skip=("v_head",))


def test_continue_training_peft_model(causal_lm_model_id, lora_config):
    causal_lm_model = AutoModelForCausalLM.from_pretrained(causal_lm_model_id)
    pretrained_model = get_peft_model(causal_lm_model, lora_config)

    with tempfile.TemporaryDirectory() as tmp_dir:
        pretrained_model.save_pretrained(tmp_dir)
        # set is_trainable to True
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_dir, is_trainable=True)
        # Check that the number of trainable parameters is correct
        assert nb_trainable_params(model) == 10273
        # rljax: without is_trainable (PEFT's default) the loaded adapter is frozen; the value head trains
        frozen = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_dir)
        assert nb_trainable_params(frozen) == 33
