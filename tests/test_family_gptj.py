"""GPT-J (rljax.models.gptj) against transformers' PyTorch GPTJForCausalLM.

Tiny config with GPT-J's particulars: rotary on the first 4 of 8 head dims (interleaved pairs),
parallel attention + MLP block from one LayerNorm, bias-free q/k/v/out projections, and an
untied ``lm_head`` with a bias.
"""
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
from rljax.models.gptj import GPTJConfig
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32, bos_token_id=1,
             eos_token_id=2)


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    """(torch model, checkpoint directory written by transformers, rljax model, params)."""
    from _family_checks import build_torch_lm
    from rljax.models import from_pretrained

    torch_model = build_torch_lm(transformers.GPTJConfig(**SMALL))
    path = tmp_path_factory.mktemp("gptj")
    torch_model.save_pretrained(path, safe_serialization=True)
    model, params = from_pretrained(str(path))
    return torch_model, str(path), model, params


def test_logits_match_transformers_on_left_padded_batch(gptj):
    check_logits(gptj[0], gptj[1], VOCAB)


def test_cached_prefill_then_decode_equals_uncached_forward(gptj):
    check_cached_decode(gptj[2], gptj[3], VOCAB)


def test_greedy_generation_equals_transformers_generate(gptj):
    torch_model, _, model, params = gptj
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(gptj, tmp_path):
    _, path, model, params = gptj
    check_save_roundtrip(model, params, tmp_path, "GPTJForCausalLM", VOCAB)
    names = set(load_state_dict(str(tmp_path)))
    assert names == set(load_state_dict(path)) and "lm_head.bias" in names


def test_param_names_are_the_checkpoint_names(gptj):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, path, _, params = gptj
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_matches_transformers_sequence_classification(gptj, tmp_path):
    check_score_head(gptj[1], tmp_path, "GPTJForSequenceClassification", VOCAB)


def test_ppo_step_runs(gptj):
    check_ppo_step(gptj[1], VOCAB)


def test_dpo_step_runs(gptj):
    check_dpo_step(gptj[1], VOCAB)


def test_sharding_rules_split_heads_and_mlp(gptj):
    params = gptj[3]
    assert infer_family(params) == "gptj"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["transformer"]["h_0"]
    assert tuple(layer["attn"]["q_proj"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["attn"]["out_proj"]["kernel"]) == ("model", "fsdp")
    assert tuple(layer["mlp"]["fc_out"]["kernel"]) == ("model", "fsdp")
    assert tuple(specs["lm_head"]["bias"]) == ("model",)


def test_positions_past_n_positions_are_rejected_for_the_cache(gptj):
    """HF indexes a sinusoid table of n_positions rows; rljax refuses a longer cache up front."""
    model = gptj[2]
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        model.init_cache(1, 33)


def test_config_rejects_what_it_cannot_run():
    assert GPTJConfig.from_dict(SMALL).head_dim == 8
    with pytest.raises(ValueError, match="rotary_dim"):
        GPTJConfig.from_dict({**SMALL, "rotary_dim": None})
    with pytest.raises(ValueError, match="rotary_dim"):
        GPTJConfig.from_dict({**SMALL, "rotary_dim": 16})  # more than head_dim
    with pytest.raises(ValueError, match="tie_word_embeddings=True is not supported for gptj"):
        GPTJConfig.from_dict({**SMALL, "tie_word_embeddings": True})
    back = transformers.GPTJConfig.from_dict(GPTJConfig.from_dict(SMALL).to_dict())
    assert (back.rotary_dim, back.n_embd, back.n_positions) == (4, 32, 32)
    assert np.isclose(back.layer_norm_epsilon, 1e-5)
