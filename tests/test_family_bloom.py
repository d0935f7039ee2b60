"""BLOOM (rljax.models.bloom) against transformers' PyTorch BloomForCausalLM.

Tiny config with BLOOM's particulars: ALiBi with 6 heads (not a power of two, so the extra
slope series is used), per-head fused query_key_value, the embedding LayerNorm, a tied head.
A second variant takes the residual after the norms (apply_residual_connection_post_layernorm).
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
from rljax.models.bloom import BloomConfig, alibi_slopes
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, bos_token_id=1, eos_token_id=2)
VARIANTS = {"bloom": {}, "post_layernorm_residual": {"apply_residual_connection_post_layernorm": True}}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def bloom(request, tmp_path_factory):
    """(variant, torch model, checkpoint directory written by transformers, rljax model, params)."""
    from _family_checks import build_torch_lm
    from rljax.models import from_pretrained

    torch_model = build_torch_lm(transformers.BloomConfig(**SMALL, **VARIANTS[request.param]))
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path, safe_serialization=True)
    model, params = from_pretrained(str(path))
    return request.param, torch_model, str(path), model, params


def test_logits_match_transformers_on_left_padded_batch(bloom):
    check_logits(bloom[1], bloom[2], VOCAB)


def test_cached_prefill_then_decode_equals_uncached_forward(bloom):
    check_cached_decode(bloom[3], bloom[4], VOCAB)


def test_greedy_generation_equals_transformers_generate(bloom):
    _, torch_model, _, model, params = bloom
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(bloom, tmp_path):
    name, _, path, model, params = bloom
    if name != "bloom":
        pytest.skip("one variant is enough")
    check_save_roundtrip(model, params, tmp_path, "BloomForCausalLM", VOCAB)
    assert set(load_state_dict(str(tmp_path))) == set(load_state_dict(path))


def test_param_names_are_the_checkpoint_names(bloom):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, _, path, _, params = bloom
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_matches_transformers_sequence_classification(bloom, tmp_path):
    if bloom[0] != "bloom":
        pytest.skip("one variant is enough for the head")
    check_score_head(bloom[2], tmp_path, "BloomForSequenceClassification", VOCAB)


def test_ppo_step_runs(bloom):
    if bloom[0] != "bloom":
        pytest.skip("one variant is enough for a training step")
    check_ppo_step(bloom[2], VOCAB)


def test_dpo_step_runs(bloom):
    if bloom[0] != "bloom":
        pytest.skip("one variant is enough for a training step")
    check_dpo_step(bloom[2], VOCAB)


def test_sharding_rules_split_heads_and_mlp(bloom):
    params = bloom[4]
    assert infer_family(params) == "bloom"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["transformer"]["h_0"]
    assert tuple(layer["self_attention"]["query_key_value"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["mlp"]["dense_4h_to_h"]["kernel"]) == ("model", "fsdp")


def test_alibi_slopes_and_legacy_config_names():
    import torch
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (4, 6, 8, 12):
        ref = _get_alibi_slopes(heads, torch.device("cpu")).numpy()
        np.testing.assert_allclose(alibi_slopes(heads), ref, rtol=1e-6)  # float32 pow: at most 1 ulp apart
    legacy = BloomConfig.from_dict({"n_embed": 48, "num_hidden_layers": 3, "num_attention_heads": 6,
                                    "vocab_size": VOCAB, "model_type": "bloom"})
    assert (legacy.hidden_size, legacy.n_layer, legacy.n_head) == (48, 3, 6)
    back = transformers.BloomConfig.from_dict(legacy.to_dict())
    assert (back.hidden_size, back.n_layer, back.n_head) == (48, 3, 6)


def test_reference_sharing_covers_the_embedding_layernorm(bloom):
    """TRL's create_reference_model(num_shared_layers=k) shares everything before layer k,
    BLOOM's word_embeddings_layernorm included."""
    from rljax.trainers.ppo import shared_layer_mask

    mask = shared_layer_mask(bloom[4], 1)["transformer"]
    assert mask["word_embeddings"]["embedding"] and mask["word_embeddings_layernorm"]["scale"]
    assert mask["h_0"]["self_attention"]["dense"]["kernel"] and not mask["h_1"]["self_attention"]["dense"]["kernel"]
    assert not mask["ln_f"]["scale"]
