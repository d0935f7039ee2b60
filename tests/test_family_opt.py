"""OPT (rljax.models.opt) against transformers' PyTorch OPTForCausalLM.

Three tiny variants: OPT-125m's layout (pre-LN, final norm, tied head), OPT-350m's (post-LN, no
final norm, ``word_embed_proj_dim`` < hidden_size with project_in/project_out), and one with no
biases, no layer-norm affine params, ``_remove_final_layer_norm`` and an untied head.
"""
import jax
import numpy as np
import pytest
import transformers
from flax.traverse_util import flatten_dict

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
from rljax.models.hub import hf_name, load_state_dict
from rljax.models.opt import OPTConfig
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
             max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "opt125m": lambda: transformers.OPTConfig(**SMALL),
    "opt350m": lambda: transformers.OPTConfig(**SMALL, do_layer_norm_before=False, word_embed_proj_dim=16),
    "untied_nobias": lambda: transformers.OPTConfig(
        **SMALL, word_embed_proj_dim=16, enable_bias=False, layer_norm_elementwise_affine=False,
        _remove_final_layer_norm=True, tie_word_embeddings=False),
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
def opt(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def opt350m(tmp_path_factory):
    return _build("opt350m", tmp_path_factory)


def test_logits_match_transformers_on_left_padded_batch(opt):
    _, torch_model, path, _, _ = opt
    check_logits(torch_model, path, VOCAB)


def test_logits_match_transformers_default_positions(opt350m):
    """Without position_ids transformers derives OPT's positions from the mask; so do we."""
    _, torch_model, path, _, _ = opt350m
    check_logits(torch_model, path, VOCAB, pass_positions=False)


def test_cached_prefill_then_decode_equals_uncached_forward(opt):
    check_cached_decode(opt[3], opt[4], VOCAB)


def test_greedy_generation_equals_transformers_generate(opt):
    _, torch_model, _, model, params = opt
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(opt, tmp_path):
    _, _, path, model, params = opt
    check_save_roundtrip(model, params, tmp_path, "OPTForCausalLM", VOCAB)
    assert set(load_state_dict(str(tmp_path))) == set(load_state_dict(path))


def test_param_names_are_the_checkpoint_names(opt):
    name, _, path, _, params = opt
    names = {hf_name(p) for p in flatten_dict(params)}
    assert names == set(load_state_dict(path)) - {"lm_head.weight"} | ({"lm_head.weight"} if name == "untied_nobias"
                                                                          else set())
    assert ("model.decoder.project_in.weight" in names) == (name != "opt125m")
    assert ("model.decoder.final_layer_norm.weight" in names) == (name == "opt125m")


def test_value_head_reads_the_projected_width(opt350m):
    from rljax.models.heads import value_head_model_from_pretrained

    module, params = value_head_model_from_pretrained(opt350m[2])
    assert params["v_head"]["summary"]["kernel"].shape == (16, 1)  # word_embed_proj_dim, as TRL's


def test_score_head_matches_transformers_sequence_classification(opt350m, tmp_path):
    check_score_head(opt350m[2], tmp_path, "OPTForSequenceClassification", VOCAB)


def test_ppo_step_runs(opt350m):
    check_ppo_step(opt350m[2], VOCAB)


def test_dpo_step_runs(opt350m):
    check_dpo_step(opt350m[2], VOCAB)


def test_reference_model_shares_what_trl_shares(opt):
    """TRL's create_reference_model(num_shared_layers=1) shares every parameter torch registers
    before layer 0 (for OPT: embeddings, projections and a decoder-level final norm) plus layer 0."""
    from rljax.trainers.ppo import shared_layer_mask

    _, torch_model, _, _, params = opt
    torch_names = [n for n, _ in torch_model.named_parameters()]
    first_layer = next(i for i, n in enumerate(torch_names) if n.startswith("model.decoder.layers.0."))
    before = {n for n in torch_names[:first_layer]} - {"lm_head.weight"}
    mask = flatten_dict(shared_layer_mask(params, 1))
    shared = {hf_name(p) for p, v in mask.items() if v and "layers_0" not in p}
    assert shared == before


def test_sharding_rules_split_heads_and_mlp(opt350m):
    params = opt350m[4]
    assert infer_family(params) == "opt"
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["model"]["decoder"]["layers_0"]
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["fc2"]["kernel"]) == ("model", "fsdp")


def test_config_round_trips_and_rejects_layerdrop(opt350m):
    model = opt350m[3]
    back = transformers.OPTConfig.from_dict(model.config.to_dict())
    assert (back.do_layer_norm_before, back.word_embed_proj_dim) == (False, 16)
    assert OPTConfig.from_dict({**SMALL}).word_embed_proj_dim == 32  # None -> hidden_size
    with pytest.raises(ValueError, match="layerdrop"):
        OPTConfig.from_dict({**SMALL, "layerdrop": 0.1})


def test_base_model_checkpoint_without_model_prefix_loads(opt350m, tmp_path):
    """OPTModel checkpoints (decoder.* keys, no lm_head) load with the tied head."""
    from safetensors.numpy import save_file

    _, _, path, _, params = opt350m
    sd = {k[len("model."):]: v for k, v in load_state_dict(path).items() if k.startswith("model.")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    _, loaded = from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
