"""GPT-NeoX / Pythia (rljax.models.gpt_neox) against transformers' PyTorch GPTNeoXForCausalLM.

Two tiny variants: Pythia's layout (parallel residual, 25% rotary, untied ``embed_out``) and
the sequential one (use_parallel_residual=False, 50% rotary, no attention bias, tied head).
"""
import json

import jax
import numpy as np
import pytest
import transformers

from _family_checks import (
    build_torch_lm,
    check_cached_decode,
    check_dpo_step,
    check_greedy_generation,
    check_logits,
    check_ppo_step,
    check_save_roundtrip,
    check_score_head,
)
from rljax.models import from_pretrained
from rljax.models.gpt_neox import GPTNeoXConfig
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "pythia": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.25, use_parallel_residual=True),
    "sequential_tied": lambda: transformers.GPTNeoXConfig(
        **SMALL, rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False, attention_bias=False,
        tie_word_embeddings=True),
}


_BUILT = {}


def _build(name, tmp_path_factory):
    """(variant, torch model, checkpoint directory written by transformers, rljax model, params), once."""
    if name not in _BUILT:
        torch_model = build_torch_lm(VARIANTS[name]())
        path = tmp_path_factory.mktemp(name)
        torch_model.save_pretrained(path, safe_serialization=True)
        model, params = from_pretrained(str(path))
        _BUILT[name] = (name, torch_model, str(path), model, params)
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def neox(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    return _build("pythia", tmp_path_factory)


def test_logits_match_transformers_on_left_padded_batch(neox):
    _, torch_model, path, _, _ = neox
    check_logits(torch_model, path, VOCAB)


def test_cached_prefill_then_decode_equals_uncached_forward(neox):
    check_cached_decode(neox[3], neox[4], VOCAB)


def test_greedy_generation_equals_transformers_generate(neox):
    _, torch_model, _, model, params = neox
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(neox, tmp_path):
    name, _, _, model, params = neox
    check_save_roundtrip(model, params, tmp_path, "GPTNeoXForCausalLM", VOCAB)
    names = set(load_state_dict(str(tmp_path)))
    assert ("embed_out.weight" in names) == (name == "pythia")  # checkpoint name kept; tied heads store none
    assert names == set(load_state_dict(neox[2]))


def test_param_names_are_the_checkpoint_names(neox):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, _, path, _, params = neox
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_matches_transformers_sequence_classification(pythia, tmp_path):
    check_score_head(pythia[2], tmp_path, "GPTNeoXForSequenceClassification", VOCAB)


def test_ppo_step_runs(pythia):
    check_ppo_step(pythia[2], VOCAB)


def test_dpo_step_runs(pythia):
    check_dpo_step(pythia[2], VOCAB)


def test_sharding_rules_split_heads_and_mlp(pythia):
    _, _, _, _, params = pythia
    assert infer_family(params) == "gpt_neox"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["gpt_neox"]["layers_0"]
    assert tuple(layer["attention"]["query_key_value"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["mlp"]["dense_4h_to_h"]["kernel"]) == ("model", "fsdp")


def test_config_reads_legacy_and_v5_rope_fields_and_writes_legacy(pythia):
    _, torch_model, path, model, _ = pythia
    saved = json.load(open(f"{path}/config.json"))  # transformers 5 writes rope_parameters
    assert "rope_parameters" in saved and model.config.rotary_pct == torch_model.config.rope_parameters[
        "partial_rotary_factor"]
    legacy = GPTNeoXConfig.from_dict({**SMALL, "rotary_pct": 0.5, "rotary_emb_base": 500.0,
                                      "use_parallel_residual": False})
    assert (legacy.rotary_ndims, legacy.rotary_emb_base, legacy.use_parallel_residual) == (4, 500.0, False)
    d = model.config.to_dict()
    back = transformers.GPTNeoXConfig.from_dict(d)
    assert back.rope_parameters["partial_rotary_factor"] == model.config.rotary_pct
    assert back.rope_parameters["rope_theta"] == model.config.rotary_emb_base
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        GPTNeoXConfig.from_dict({**SMALL, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="rotary_pct"):
        GPTNeoXConfig.from_dict({**SMALL, "rotary_pct": 0.4})  # 3 rotary dims of head_dim 8


def test_pythia_buffers_in_old_checkpoints_are_ignored(pythia, tmp_path):
    """Older Pythia checkpoints also store the causal-mask and rotary buffers; loading skips them."""
    from safetensors.numpy import save_file

    _, _, path, _, params = pythia
    sd = load_state_dict(path)
    sd["gpt_neox.layers.0.attention.bias"] = np.ones((1, 1, 4, 4), bool)
    sd["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.ones(1, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    _, loaded = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_reference_model_shares_what_trl_shares(pythia):
    """TRL's create_reference_model(num_shared_layers=1) shares what torch registers before layer 0
    (the input embedding) plus layer 0."""
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name
    from rljax.trainers.ppo import shared_layer_mask

    _, torch_model, _, _, params = pythia
    torch_names = [n for n, _ in torch_model.named_parameters()]
    first_layer = next(i for i, n in enumerate(torch_names) if n.startswith("gpt_neox.layers.0."))
    mask = flatten_dict(shared_layer_mask(params, 1))
    assert {hf_name(p) for p, v in mask.items() if v and "layers_0" not in p} == set(torch_names[:first_layer])
