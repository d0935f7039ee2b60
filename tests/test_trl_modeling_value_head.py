"""Port of TRL 0.7.11 ``tests/test_modeling_value_head.py`` onto rljax.

Same cases and inputs. TRL loops over hub checkpoints ("trl-internal-testing/tiny-random-*");
here each is a tiny local checkpoint written by transformers (``save_pretrained``) into a tmp
dir, one pytest parameter per architecture. Architectures rljax does not implement (the
seq2seq ones other than T5 and mT5) are kept as skipped parameters. TRL's list has Llama commented out ("uncomment on the next transformers release");
it runs here. "GPT2LMHeadModel-safetensors-sharded" stands in for TRL's sharded checkpoints.
Changes beyond imports: ``torch.allclose`` on state-dict arrays -> ``np.allclose``; dtype
checks against ``jnp.bfloat16``; the reference-model tests take a gradient step with
``jax.grad`` + optax instead of ``loss.backward()`` + a torch optimizer.
"""
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from rljax.losses import sft_loss
from rljax.models import AutoModelForCausalLM, AutoModelForCausalLMWithValueHead
from rljax.models.auto import AutoModelForSeq2SeqLM, AutoModelForSeq2SeqLMWithValueHead
from rljax.trainers.ppo import create_reference_model, merge_reference, shared_layer_mask

NOT_YET = "architecture not implemented in rljax yet (a separate issue)"
SEQ2SEQ_NOT_YET = "encoder-decoder architecture not implemented in rljax (it has T5 and mT5)"


def _skip(name, reason=NOT_YET):
    return pytest.param(name, marks=pytest.mark.skip(reason=reason))


ALL_CAUSAL_LM_MODELS = [
    "CodeGenForCausalLM",
    "GPTJForCausalLM",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "GPT2LMHeadModel",
    "CodeGenForCausalLM-sharded",
    "GPTNeoXForCausalLM-safetensors-sharded",
    "GPTNeoXForCausalLM-safetensors",
    "LlamaForCausalLM",
    "GPT2LMHeadModel-safetensors-sharded",
]

SEQ2SEQ_IMPLEMENTED = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                       "T5ForConditionalGeneration-safetensors-sharded")
ALL_SEQ2SEQ_MODELS = [
    name if name in SEQ2SEQ_IMPLEMENTED else _skip(name, SEQ2SEQ_NOT_YET)
    for name in [
        "BartForConditionalGeneration", "BigBirdPegasusForConditionalGeneration",
        "BlenderbotForConditionalGeneration", "BlenderbotSmallForConditionalGeneration",
        "FSMTForConditionalGeneration", "LEDForConditionalGeneration", "LongT5ForConditionalGeneration",
        "M2M100ForConditionalGeneration", "MarianMTModel", "MBartForConditionalGeneration",
        "MT5ForConditionalGeneration", "MvpForConditionalGeneration", "PegasusForConditionalGeneration",
        "PegasusXForConditionalGeneration", "PLBartForConditionalGeneration",
        "ProphetNetForConditionalGeneration", "SwitchTransformersForConditionalGeneration",
        "T5ForConditionalGeneration", "T5ForConditionalGeneration-safetensors-sharded",
    ]
]

VOCAB = 128
_CONFIGS = {
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=64, bos_token_id=1, eos_token_id=2),
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=64,
                                                         bos_token_id=1, eos_token_id=2),
    "CodeGenForCausalLM": lambda: transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                             rotary_dim=4, n_positions=64, bos_token_id=1,
                                                             eos_token_id=2),
    "GPTNeoForCausalLM": lambda: transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                                           attention_types=[[["global", "local"], 1]], window_size=4,
                                                           max_position_embeddings=64, bos_token_id=1,
                                                           eos_token_id=2),
    "BloomForCausalLM": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                                         bos_token_id=1, eos_token_id=2),
    "GPTJForCausalLM": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                       n_positions=64, bos_token_id=1, eos_token_id=2),
    "GPTNeoXForCausalLM": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=64, bos_token_id=1,
                                                             eos_token_id=2),
    "OPTForCausalLM": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64,
                                                     word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                                                     eos_token_id=2),
}
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
_SEQ2SEQ_CONFIGS = {
    "T5ForConditionalGeneration": lambda: transformers.T5Config(**_T5),
    "T5Model": lambda: transformers.T5Config(**_T5),
    "MT5ForConditionalGeneration": lambda: transformers.MT5Config(**_T5),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> local checkpoint directory (written once per module by transformers)."""
    cache = {}

    def get(name):
        if name not in cache:
            base, _, variant = name.partition("-")
            torch.manual_seed(0)
            if base == "GPT2Model":  # a base model without an LM head
                model = transformers.GPT2Model(_CONFIGS["GPT2LMHeadModel"]())
            elif base in _SEQ2SEQ_CONFIGS:
                model = getattr(transformers, base)(_SEQ2SEQ_CONFIGS[base]())
            else:
                model = transformers.AutoModelForCausalLM.from_config(_CONFIGS[base]())
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, max_shard_size="20KB" if "sharded" in variant else "5GB")
            cache[name] = str(path)
        return cache[name]

    return get


@pytest.fixture(params=ALL_CAUSAL_LM_MODELS)
def model_name(request, checkpoints):
    return checkpoints(request.param)


def _allclose(a, b):
    return np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --------------------------------------------------------------------------------------------
# VHeadModelTester + CausalLMValueHeadModelTester
# --------------------------------------------------------------------------------------------


class TestCausalLMValueHeadModel:
    trl_model_class = AutoModelForCausalLMWithValueHead
    transformers_model_class = AutoModelForCausalLM

    def test_value_head(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        assert hasattr(model, "v_head")

    def test_value_head_shape(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        assert model.v_head.summary.weight.shape[0] == 1

    def test_value_head_init_random(self, model_name):
        # random init by default: the bias differs from zeros
        model = self.trl_model_class.from_pretrained(model_name)
        assert not _allclose(model.v_head.summary.bias, np.zeros_like(model.v_head.summary.bias))

    def test_value_head_not_str(self, model_name):
        pretrained_model = self.transformers_model_class.from_pretrained(model_name)
        model = self.trl_model_class.from_pretrained(pretrained_model)
        assert hasattr(model, "v_head")

    def test_from_save_trl(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        with tempfile.TemporaryDirectory() as tmp_dir:
            model.save_pretrained(tmp_dir)
            model_from_save = self.trl_model_class.from_pretrained(tmp_dir)
        # the weights are the same, v_head included
        for key in model_from_save.state_dict():
            assert _allclose(model_from_save.state_dict()[key], model.state_dict()[key])

    def test_from_save_trl_sharded(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        with tempfile.TemporaryDirectory() as tmp_dir:
            model.save_pretrained(tmp_dir)  # (TRL's case saves unsharded; the next save shards for real)
            model_from_save = self.trl_model_class.from_pretrained(tmp_dir)
            model.save_pretrained(tmp_dir, max_shard_size="20KB", overwrite=True)
            model_from_sharded = self.trl_model_class.from_pretrained(tmp_dir)
        for key in model_from_save.state_dict():
            assert _allclose(model_from_save.state_dict()[key], model.state_dict()[key])
            assert _allclose(model_from_sharded.state_dict()[key], model.state_dict()[key])

    def test_from_save_transformers_sharded(self, model_name):
        transformers_model = self.trl_model_class.transformers_parent_class.from_pretrained(model_name)
        trl_model = self.trl_model_class.from_pretrained(model_name)
        with tempfile.TemporaryDirectory() as tmp_dir:
            trl_model.save_pretrained(tmp_dir, max_shard_size="1MB")
            transformers_model_from_save = self.trl_model_class.transformers_parent_class.from_pretrained(tmp_dir)
        for key in transformers_model.state_dict():
            assert _allclose(transformers_model_from_save.state_dict()[key], transformers_model.state_dict()[key])

    def test_from_save_transformers(self, model_name):
        transformers_model = self.trl_model_class.transformers_parent_class.from_pretrained(model_name)
        trl_model = self.trl_model_class.from_pretrained(model_name)
        with tempfile.TemporaryDirectory() as tmp_dir:
            trl_model.save_pretrained(tmp_dir)
            transformers_model_from_save = self.trl_model_class.transformers_parent_class.from_pretrained(tmp_dir)
            # (rljax addition) PyTorch transformers reads the same directory, v_head ignored
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_dir)
        for key in transformers_model.state_dict():
            assert _allclose(transformers_model_from_save.state_dict()[key], transformers_model.state_dict()[key])
        # the trl model has the transformers model's keys (except the v_head), with the same weights
        for key in trl_model.state_dict():
            if "v_head" not in key:
                assert key in transformers_model.state_dict()
                assert _allclose(trl_model.state_dict()[key], transformers_model.state_dict()[key])
        assert set(transformers_model_from_save.state_dict().keys()) == set(transformers_model.state_dict().keys())
        torch_sd = torch_model.state_dict()
        for key, value in transformers_model.state_dict().items():
            # transformers 5 names GPT-NeoX's embed_out "lm_head" in memory (the checkpoint keeps embed_out)
            torch_key = key if key in torch_sd else {"embed_out.weight": "lm_head.weight"}.get(key, key)
            assert _allclose(value, torch_sd[torch_key].numpy())

    def test_inference(self, model_name):
        EXPECTED_OUTPUT_SIZE = 3
        model = self.trl_model_class.from_pretrained(model_name)
        input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        outputs = model(input_ids)
        # always 3 values: logits, loss and value states
        assert len(outputs) == EXPECTED_OUTPUT_SIZE

    def test_dropout_config(self, model_name):
        pretrained_model = self.transformers_model_class.from_pretrained(model_name)
        pretrained_model.config.summary_dropout_prob = 0.5
        model = self.trl_model_class.from_pretrained(pretrained_model)
        # the v_head has the config's dropout
        assert model.v_head.dropout.p == pretrained_model.config.summary_dropout_prob

    def test_dropout_kwargs(self, model_name):
        v_head_kwargs = {"summary_dropout_prob": 0.5}
        model = self.trl_model_class.from_pretrained(model_name, **v_head_kwargs)
        assert model.v_head.dropout.p == 0.5
        model = self.trl_model_class.from_pretrained(model_name, summary_dropout_prob=0.5)
        assert model.v_head.dropout.p == 0.5

    def test_generate(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        # just check that generation works
        _ = model.generate(input_ids)

    def test_raise_error_not_causallm(self, checkpoints):
        # a model without an LM head
        model_id = checkpoints("GPT2Model")
        with pytest.raises(ValueError):
            pretrained_model = AutoModelForCausalLM.from_pretrained(model_id)
            _ = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model.transformer)

    def test_transformers_bf16_kwargs(self, model_name):
        trl_model = self.trl_model_class.from_pretrained(model_name, torch_dtype=torch.bfloat16)
        lm_head_namings = self.trl_model_class.lm_head_namings
        assert any(hasattr(trl_model.pretrained_model, lm_head_naming) for lm_head_naming in lm_head_namings)
        for lm_head_naming in lm_head_namings:
            if hasattr(trl_model.pretrained_model, lm_head_naming):
                assert getattr(trl_model.pretrained_model, lm_head_naming).weight.dtype == jnp.bfloat16
        dummy_input = torch.LongTensor([[0, 1, 0, 1]])
        # a dummy forward pass works in half precision
        _ = trl_model(dummy_input)

    @pytest.mark.skip(reason="TRL skips it too: needs a HF token (rljax: save_pretrained + huggingface_hub upload)")
    def test_push_to_hub(self, model_name):
        pass


# --------------------------------------------------------------------------------------------
# Seq2SeqValueHeadModelTester: VHeadModelTester's cases (inherited) + the seq2seq overrides
# --------------------------------------------------------------------------------------------


class TestSeq2SeqValueHeadModel(TestCausalLMValueHeadModel):
    trl_model_class = AutoModelForSeq2SeqLMWithValueHead
    transformers_model_class = AutoModelForSeq2SeqLM

    @pytest.fixture(params=ALL_SEQ2SEQ_MODELS)
    def model_name(self, request, checkpoints):
        return checkpoints(request.param)

    def test_inference(self, model_name):
        EXPECTED_OUTPUT_SIZE = 3
        model = self.trl_model_class.from_pretrained(model_name)
        input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        decoder_input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        outputs = model(input_ids, decoder_input_ids=decoder_input_ids)
        # always 3 values: logits, loss and value states
        assert len(outputs) == EXPECTED_OUTPUT_SIZE
        assert outputs[2].shape == (1, 10)  # (rljax addition) one value per decoder position

    def test_generate(self, model_name):
        model = self.trl_model_class.from_pretrained(model_name)
        input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        decoder_input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        # just check that generation works
        out = model.generate(input_ids, decoder_input_ids=decoder_input_ids)
        # (rljax addition) HF's max_length=20 counts the decoder prefix
        assert out.shape[1] <= 20 and (np.asarray(out[:, :10]) == np.arange(1, 11)).all()

    def test_from_save_transformers(self, model_name):
        transformers_model = self.trl_model_class.transformers_parent_class.from_pretrained(model_name)
        trl_model = self.trl_model_class.from_pretrained(model_name)
        with tempfile.TemporaryDirectory() as tmp_dir:
            trl_model.save_pretrained(tmp_dir)
            transformers_model_from_save = self.trl_model_class.transformers_parent_class.from_pretrained(tmp_dir)
            # (rljax addition) PyTorch transformers reads the same directory, v_head ignored
            torch_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_dir)
        for key in transformers_model.state_dict():
            assert _allclose(transformers_model_from_save.state_dict()[key], transformers_model.state_dict()[key])
        for key in trl_model.state_dict():
            if "v_head" not in key:
                assert key in transformers_model.state_dict()
                assert _allclose(trl_model.state_dict()[key], transformers_model.state_dict()[key])
        assert set(transformers_model_from_save.state_dict().keys()) == set(transformers_model.state_dict().keys())
        torch_sd = torch_model.state_dict()
        for key, value in transformers_model.state_dict().items():
            assert _allclose(value, torch_sd[key].numpy())

    def test_raise_error_not_causallm(self, checkpoints):
        # a model without an LM head (TRL: AutoModel.from_pretrained("tiny-random-T5Model"))
        model_id = checkpoints("T5Model")
        with pytest.raises(ValueError):
            pretrained_model = AutoModelForSeq2SeqLM.from_pretrained(model_id)
            _ = self.trl_model_class.from_pretrained(pretrained_model.encoder)

    def test_transformers_bf16_kwargs(self, model_name):
        trl_model = self.trl_model_class.from_pretrained(model_name, torch_dtype=torch.bfloat16)
        lm_head_namings = self.trl_model_class.lm_head_namings
        assert any(hasattr(trl_model.pretrained_model, lm_head_naming) for lm_head_naming in lm_head_namings)
        for lm_head_naming in lm_head_namings:
            if hasattr(trl_model.pretrained_model, lm_head_naming):
                assert getattr(trl_model.pretrained_model, lm_head_naming).weight.dtype == jnp.bfloat16
        dummy_input = torch.LongTensor([[0, 1, 0, 1]])
        # a dummy forward pass works in half precision
        _ = trl_model(input_ids=dummy_input, decoder_input_ids=dummy_input)

    def test_causal_classes_refuse_encoder_decoders(self, checkpoints):
        # (rljax addition) the causal value-head class does not take a T5 and vice versa
        with pytest.raises(ValueError):
            AutoModelForCausalLMWithValueHead.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(
                checkpoints("T5ForConditionalGeneration")))
        with pytest.raises(ValueError):
            self.trl_model_class.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoints("GPT2LMHeadModel")))


# --------------------------------------------------------------------------------------------
# ReferenceModelTest
# --------------------------------------------------------------------------------------------


def _as_model(ref, policy):
    """create_reference_model's result as a model: a model object already, or reference params
    (shared layers left out, read from the frozen policy)."""
    if hasattr(ref, "params"):
        return ref
    return AutoModelForCausalLMWithValueHead(policy.module, merge_reference(policy.params, ref))


class TestReferenceModel:
    layer_format = "pretrained_model.transformer.h.{layer}.attn.c_attn.weight"

    @pytest.fixture(autouse=True)
    def setup(self, checkpoints):
        self.model = AutoModelForCausalLMWithValueHead.from_pretrained(checkpoints("GPT2LMHeadModel"))
        self.test_input = torch.tensor([[0, 1, 2, 3]])
        self.last_layer = self.model.config.n_layer - 1  # TRL's tiny GPT-2 has 5 layers and reads layer 4

    def _train_step(self, trainable=None):
        """``output[1].backward(); optimizer.step()`` with AdamW(lr=1) (frozen where ``trainable`` is False)."""
        ids = jnp.asarray(self.test_input.numpy())
        module = self.model.module
        tx = optax.adamw(1.0)
        if trainable is not None:
            labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
            tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

        @jax.jit
        def step(params):
            grads = jax.grad(lambda p: sft_loss(module.apply({"params": p}, ids).logits, ids))(params)
            updates, _ = tx.update(grads, tx.init(params), params)
            return optax.apply_updates(params, updates)

        self.model.params = step(self.model.params)
        # the TRL call itself: labels give the loss as output[1]
        output = self.model(input_ids=self.test_input, labels=self.test_input)
        assert output[1] is not None and np.isfinite(float(output[1]))

    def test_independent_reference(self):
        layer_0 = self.layer_format.format(layer=0)
        layer_5 = self.layer_format.format(layer=self.last_layer)

        ref_model = _as_model(create_reference_model(self.model), self.model)

        first_layer_before = np.array(self.model.get_parameter(layer_0))
        last_layer_before = np.array(self.model.get_parameter(layer_5))
        first_ref_layer_before = np.array(ref_model.get_parameter(layer_0))
        last_ref_layer_before = np.array(ref_model.get_parameter(layer_5))

        self._train_step()

        first_layer_after = np.array(self.model.get_parameter(layer_0))
        last_layer_after = np.array(self.model.get_parameter(layer_5))
        first_ref_layer_after = np.array(ref_model.get_parameter(layer_0))
        last_ref_layer_after = np.array(ref_model.get_parameter(layer_5))

        # before optimization ref and model are identical
        assert (first_layer_before == first_ref_layer_before).all()
        assert (last_layer_before == last_ref_layer_before).all()
        # ref model stays identical after optimization
        assert (first_ref_layer_before == first_ref_layer_after).all()
        assert (last_ref_layer_before == last_ref_layer_after).all()
        # optimized model changes
        assert not (first_layer_before == first_layer_after).all()
        assert not (last_layer_before == last_layer_after).all()

    def test_shared_layers(self):
        layer_0 = self.layer_format.format(layer=0)
        layer_1 = self.layer_format.format(layer=1)

        ref = create_reference_model(self.model, num_shared_layers=1)

        def ref_model():
            return _as_model(ref, self.model)

        first_layer_before = np.array(self.model.get_parameter(layer_0))
        second_layer_before = np.array(self.model.get_parameter(layer_1))
        first_ref_layer_before = np.array(ref_model().get_parameter(layer_0))
        second_ref_layer_before = np.array(ref_model().get_parameter(layer_1))

        trainable = jax.tree.map(lambda s: not s, shared_layer_mask(self.model.params, 1))
        self._train_step(trainable)

        first_layer_after = np.array(self.model.get_parameter(layer_0))
        second_layer_after = np.array(self.model.get_parameter(layer_1))
        first_ref_layer_after = np.array(ref_model().get_parameter(layer_0))
        second_ref_layer_after = np.array(ref_model().get_parameter(layer_1))

        # before optimization ref and model are identical
        assert (first_layer_before == first_ref_layer_before).all()
        assert (second_layer_before == second_ref_layer_before).all()
        # ref model stays identical after optimization
        assert (first_ref_layer_before == first_ref_layer_after).all()
        assert (second_ref_layer_before == second_ref_layer_after).all()
        # first layer of optimized model stays the same
        assert (first_layer_before == first_layer_after).all()
        # other layers in optimized model change
        assert not (second_layer_before == second_layer_after).all()
