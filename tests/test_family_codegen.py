"""CodeGen (rljax.models.codegen) against transformers' PyTorch CodeGenForCausalLM.

Tiny config with CodeGen's particulars: the fused ``qkv_proj`` split into 4 shards of (q, v, k)
(8 heads, so 2 per shard: a wrong split order or shard layout changes the logits), rotary on the
first 2 of 4 head dims, GPT-J's parallel block and biased ``lm_head``. transformers has no
``CodeGenForSequenceClassification``; the score head is checked against ``CodeGenModel``'s hidden
states instead.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from _family_checks import (
    check_cached_decode,
    check_dpo_step,
    check_greedy_generation,
    check_logits,
    check_ppo_step,
    check_save_roundtrip,
    left_padded_batch,
)
from rljax.models.codegen import CodeGenConfig
from rljax.models.hub import load_state_dict
from rljax.sharding import infer_family, make_mesh, partition_specs

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=8, rotary_dim=2, n_positions=32, n_ctx=32,
             bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    """(torch model, checkpoint directory written by transformers, rljax model, params)."""
    from _family_checks import build_torch_lm
    from rljax.models import from_pretrained

    torch_model = build_torch_lm(transformers.CodeGenConfig(**SMALL))
    path = tmp_path_factory.mktemp("codegen")
    torch_model.save_pretrained(path, safe_serialization=True)
    model, params = from_pretrained(str(path))
    return torch_model, str(path), model, params


def test_logits_match_transformers_on_left_padded_batch(codegen):
    check_logits(codegen[0], codegen[1], VOCAB)


def test_cached_prefill_then_decode_equals_uncached_forward(codegen):
    check_cached_decode(codegen[2], codegen[3], VOCAB)


def test_greedy_generation_equals_transformers_generate(codegen):
    torch_model, _, model, params = codegen
    check_greedy_generation(torch_model, model, params, VOCAB)


def test_rljax_save_loads_in_transformers_with_same_logits(codegen, tmp_path):
    _, path, model, params = codegen
    check_save_roundtrip(model, params, tmp_path, "CodeGenForCausalLM", VOCAB)
    assert set(load_state_dict(str(tmp_path))) == set(load_state_dict(path))


def test_param_names_are_the_checkpoint_names(codegen):
    from flax.traverse_util import flatten_dict

    from rljax.models.hub import hf_name

    _, path, _, params = codegen
    assert {hf_name(p) for p in flatten_dict(params)} == set(load_state_dict(path))


def test_score_head_reads_the_trunk_at_each_rows_last_token(codegen, tmp_path):
    """score = hidden(last real token) @ score.weight.T, hidden from transformers' CodeGenModel;
    save -> load keeps it."""
    from rljax.models import save_pretrained
    from rljax.models.heads import sequence_score_from_pretrained

    torch_model, path, _, _ = codegen
    module, params = sequence_score_from_pretrained(path, num_labels=1)
    ids, mask, pos = left_padded_batch(VOCAB, pads=(4, 0, 7))
    ours = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    with torch.no_grad():
        hidden = torch_model.transformer(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                         position_ids=torch.tensor(pos)).last_hidden_state.numpy()
    ref = hidden[:, -1] @ np.asarray(params["score"]["kernel"])  # left-padded rows end with a real token
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    save_pretrained(module, params, str(tmp_path))
    _, params2 = sequence_score_from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_ppo_step_runs(codegen):
    check_ppo_step(codegen[1], VOCAB)


def test_dpo_step_runs(codegen):
    check_dpo_step(codegen[1], VOCAB)


def test_sharding_rules_split_heads_and_mlp(codegen):
    params = codegen[3]
    assert infer_family(params) == "gptj"  # GPT-J's table covers qkv_proj
    specs = partition_specs(params, make_mesh(data=2, fsdp=2, model=2))
    layer = specs["transformer"]["h_0"]
    assert tuple(layer["attn"]["qkv_proj"]["kernel"]) == ("fsdp", "model")
    assert tuple(layer["mlp"]["fc_in"]["kernel"]) == ("fsdp", "model")


def test_config_rejects_heads_that_do_not_split_into_four_shards():
    config = CodeGenConfig.from_dict(SMALL)
    assert (config.head_dim, config.n_ctx, config.model_type) == (4, 32, "codegen")
    with pytest.raises(ValueError, match="multiple of 4"):
        CodeGenConfig.from_dict({**SMALL, "n_head": 2, "rotary_dim": 2})
    back = transformers.CodeGenConfig.from_dict(config.to_dict())
    assert (back.rotary_dim, back.n_head, back.n_positions) == (2, 8, 32)
