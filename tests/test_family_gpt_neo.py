"""GPT-Neo (rljax.models.gpt_neo) against transformers' PyTorch GPTNeoForCausalLM.

Tiny config with GPT-Neo's particulars: a global then a local layer with a 3-token window
(shorter than the 12-token test rows, so the window changes the logits), unscaled attention
scores, learned positions, a tied head.
"""
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
from rljax.models.gpt_neo import GPTNeoConfig
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
             window_size=3, max_position_embeddings=32, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    """(torch model, checkpoint directory written by transformers, rljax model, params)."""
    from _family_checks import build_torch_lm
    from rljax.models import from_pretrained

    torch_model = build_torch_lm(transformers.GPTNeoConfig(**SMALL))
    path = tmp_path_factory.mktemp("gpt_neo")
    torch_model.save_pretrained(path, safe_serialization=True)
    model, params = from_pretrained(str(path))
    return torch_model, str(path), model, params


def test_logits_match_transformers_on_left_padded_batch(neo):
    check_logits(neo[0], neo[1], VOCAB)


def test_the_local_window_matters(neo):
    """Sanity of the parity test: a window as wide as the rows changes the logits."""
    import dataclasses

    import numpy as np

    from _family_checks import left_padded_batch, rljax_logits
    from rljax.models.gpt_neo import GPTNeoForCausalLM

    _, _, model, params = neo
    ids, mask, _ = left_padded_batch(VOCAB)
    base = rljax_logits(model, params, ids, mask)
    wide = GPTNeoForCausalLM(dataclasses.replace(model.config, window_size=32))
    assert np.abs(rljax_logits(wide, params, ids, mask) - base).max() > 1e-3


def test_cached_prefill_then_decode_equals_uncached_forward(neo):
    check_cached_decode(neo[2], neo[3], VOCAB)


def test_greedy_generation_equals_transformers_generate(neo):
    torch_model, _, model, params = neo
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(neo, tmp_path):
    _, path, model, params = neo
    check_save_roundtrip(model, params, tmp_path, "GPTNeoForCausalLM", VOCAB)
    assert set(load_state_dict(str(tmp_path))) == set(load_state_dict(path))


def test_param_names_are_the_checkpoint_names(neo):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, path, _, params = neo
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_matches_transformers_sequence_classification(neo, tmp_path):
    check_score_head(neo[1], tmp_path, "GPTNeoForSequenceClassification", VOCAB)


def test_ppo_step_runs(neo):
    check_ppo_step(neo[1], VOCAB)


def test_dpo_step_runs(neo):
    check_dpo_step(neo[1], VOCAB)


def test_sharding_rules_split_heads_and_mlp(neo):
    params = neo[3]
    assert infer_family(params) == "gpt_neo"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["transformer"]["h_0"]
    assert tuple(layer["attn"]["attention"]["q_proj"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["attn"]["attention"]["out_proj"]["kernel"]) == ("model", "fsdp")
    assert tuple(layer["mlp"]["c_proj"]["kernel"]) == ("model", "fsdp")


def test_config_expands_attention_types_and_rejects_bad_ones():
    config = GPTNeoConfig.from_dict({**SMALL, "num_layers": 4, "attention_types": [[["global", "local"], 2]]})
    assert config.attention_layers == ("global", "local", "global", "local")
    back = transformers.GPTNeoConfig.from_dict(config.to_dict())
    assert back.attention_layers == list(config.attention_layers) and back.window_size == 3
    with pytest.raises(ValueError, match="must give num_layers"):
        GPTNeoConfig.from_dict({**SMALL, "num_layers": 3})
    with pytest.raises(ValueError, match="'global' or 'local'"):
        GPTNeoConfig.from_dict({**SMALL, "attention_types": [[["global", "sparse"], 1]]})
