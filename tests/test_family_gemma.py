"""Gemma (rljax.models.gemma) against transformers' PyTorch GemmaForCausalLM.

One tiny config with Gemma's particulars: multi-query attention (1 KV head), an explicit
``head_dim`` (16) that is not hidden / heads (8), a tied head, and norm weights perturbed away
from their zero init (so the ``1 + weight`` scaling is exercised).
"""
import jax
import numpy as np
import pytest
import transformers

from _family_checks import (
    check_cached_decode,
    check_dpo_step,
    check_greedy_generation,
    check_logits,
    check_ppo_step,
    check_save_roundtrip,
    check_score_head,
)
from rljax.models.gemma import GemmaConfig
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(torch model, checkpoint directory written by transformers, rljax model, params)."""
    from _family_checks import build_torch_lm
    from rljax.models import from_pretrained

    torch_model = build_torch_lm(transformers.GemmaConfig(**SMALL))
    path = tmp_path_factory.mktemp("gemma")
    torch_model.save_pretrained(path, safe_serialization=True)
    model, params = from_pretrained(str(path))
    return torch_model, str(path), model, params


def test_logits_match_transformers_on_left_padded_batch(gemma):
    check_logits(gemma[0], gemma[1], VOCAB)


def test_cached_prefill_then_decode_equals_uncached_forward(gemma):
    check_cached_decode(gemma[2], gemma[3], VOCAB)


def test_greedy_generation_equals_transformers_generate(gemma):
    torch_model, _, model, params = gemma
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(gemma, tmp_path):
    _, path, model, params = gemma
    check_save_roundtrip(model, params, tmp_path, "GemmaForCausalLM", VOCAB)
    assert set(load_state_dict(str(tmp_path))) == set(load_state_dict(path))  # tied: no lm_head.weight


def test_param_names_are_the_checkpoint_names(gemma):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, path, _, params = gemma
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_matches_transformers_sequence_classification(gemma, tmp_path):
    check_score_head(gemma[1], tmp_path, "GemmaForSequenceClassification", VOCAB)


def test_ppo_step_runs(gemma):
    check_ppo_step(gemma[1], VOCAB)


def test_dpo_step_runs(gemma):
    check_dpo_step(gemma[1], VOCAB)


def test_sharding_rules_are_the_llama_ones(gemma):
    from rljax.sharding import RULES

    params = gemma[3]
    assert infer_family(params) == "llama" and RULES["gemma"] is RULES["llama"]
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["model"]["layers_0"]
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["mlp"]["down_proj"]["kernel"]) == ("model", "fsdp")


def test_config_reads_legacy_fields_and_rejects_what_it_cannot_run():
    legacy = GemmaConfig.from_dict({**SMALL, "hidden_act": "gelu", "rope_theta": 500.0})
    assert (legacy.hidden_act, legacy.rope_theta) == ("gelu_pytorch_tanh", 500.0)  # "gelu" means tanh in Gemma
    v4 = GemmaConfig.from_dict({**SMALL, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"})
    assert v4.hidden_act == "gelu_pytorch_tanh"
    back = transformers.GemmaConfig.from_dict(legacy.to_dict())
    assert back.head_dim == 16 and back.rope_parameters["rope_theta"] == 500.0
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        GemmaConfig.from_dict({**SMALL, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        GemmaConfig.from_dict({**SMALL, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GemmaConfig.from_dict({**SMALL, "num_key_value_heads": 3})



def test_attention_dropout_applies_in_training_only(gemma):
    import dataclasses

    import jax.numpy as jnp

    from _family_checks import left_padded_batch
    from rljax.models.gemma import GemmaForCausalLM

    _, _, model, params = gemma
    dropping = GemmaForCausalLM(dataclasses.replace(model.config, attention_dropout=0.5))
    ids, mask, _ = left_padded_batch(VOCAB)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    run = lambda m, **kw: np.asarray(m.apply({"params": params}, ids, mask, **kw).logits)  # noqa: E731
    np.testing.assert_array_equal(run(dropping), run(model))  # eval: exact
    train = run(dropping, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert np.abs(train - run(model)).max() > 1e-3
