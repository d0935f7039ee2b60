"""rljax.models.quant: int8 / NF4 weight-only quantization of a frozen base under LoRA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.models.gpt2 import GPT2Config
from rljax.models.hub import init_params, model_from_config
from rljax.models.peft import LoraConfig, LoraModel
from rljax.models.quant import dequantize_params, param_bytes, quantize, quantize_params


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    tok = tiny_tokenizer
    module = model_from_config(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return module, init_params(module, jax.random.PRNGKey(0))


@pytest.mark.parametrize("kind, ratio, tol", [("int8", 0.27, 0.02), ("nf4", 0.15, 0.35)])
def test_quantized_base_logits_stay_close_and_bytes_drop(lm, kind, ratio, tol):
    """Logits of the quantized model vs float32: relative RMS error ||diff|| / ||logits||
    <= 2% (int8) and 35% (NF4: a random 2-layer model amplifies its ~10% per-weight error; on
    one Gaussian matrix the weight error is checked at <= 1% / 12%); the quantized kernels take
    ~1/4 (int8) and ~1/7 (NF4) of their float32 bytes; slicing a stacked [layers, in, out]
    weight (nn.scan) dequantizes to the same layer."""
    module, params = lm
    ids = jnp.asarray(np.random.RandomState(0).randint(3, module.config.vocab_size, (2, 9)))
    q = quantize_params(params, kind)
    kernels = lambda t: [x for p, x in jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: hasattr(x, "codes"))[0]
                         if getattr(p[-1], "key", None) == "kernel"]  # noqa: E731
    assert param_bytes(kernels(q)) / param_bytes(kernels(params)) < ratio
    assert param_bytes(q) < param_bytes(params)
    ref = module.apply({"params": params}, ids).logits
    got = jax.jit(lambda p: LoraModel(module).apply({"params": p}, ids).logits)(q)
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) <= tol
    back = dequantize_params(q)
    np.testing.assert_allclose(np.asarray(LoraModel(module).apply({"params": back}, ids).logits), np.asarray(got),
                               atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 64, 40))  # a stacked [layers, in, out] weight
    qw = quantize(w, kind)
    assert float(jnp.linalg.norm(qw.dequantize() - w) / jnp.linalg.norm(w)) <= {"int8": 0.01, "nf4": 0.12}[kind]
    np.testing.assert_allclose(np.asarray(jax.tree_util.tree_map(lambda x: x[1], qw).dequantize()),
                               np.asarray(qw.dequantize()[1]), atol=1e-6)


def test_qlora_sft_lowers_the_loss_and_leaves_the_base_untouched(lm, tiny_tokenizer, tmp_path):
    from tests.conftest import CORPUS
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    module, params = lm
    q = quantize_params(params, "nf4")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=3e-3, per_device_train_batch_size=8,
                     logging_steps=5, report_to=[], save_strategy="no")
    trainer = SFTTrainer((module, q), args=args, train_dataset=[{"text": t} for t in CORPUS * 2], tokenizer=tiny_tokenizer,
                         dataset_text_field="text", max_seq_length=32,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]))
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history if "loss" in h and "train_loss" not in h]
    assert losses[-1] < losses[0] - 0.3, losses
    codes = lambda t: [np.asarray(x) for x in jax.tree_util.tree_leaves(t) if x.dtype in (np.uint8, np.int8)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(codes(trainer.params), codes(q)))
    # Adam state only for the adapters: 2 moments x adapter params.
    adam = sum(x.size for x in jax.tree_util.tree_leaves(trainer.train_state.opt_state) if getattr(x, "ndim", 0) >= 1)
    adapters = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(trainer.params)[0]
                   if getattr(p[-1], "key", "") in ("lora_A", "lora_B"))
    assert adam == 2 * adapters
