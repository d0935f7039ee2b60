"""rljax.models.peft: LoRA adapters in PEFT's format, the adapter-off reference (PPO, DPO),
reward/SFT trainers with ``peft_config=``, and interop with HF ``peft`` (test-only dependency)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from rljax.models.gpt2 import GPT2Config
from rljax.models.heads import AutoModelForCausalLMWithValueHead
from rljax.models.hub import init_params, model_from_config
from rljax.models.peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    load_adapter,
    trainable_mask,
)
from rljax.ppo import PPOConfig
from rljax.trainers.ppo import PPOTrainer

BATCH = 4


def changed(a, b):
    fb = flatten_dict(b)
    return {"/".join(k) for k, v in flatten_dict(a).items() if not np.array_equal(np.asarray(v), np.asarray(fb[k]))}


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    tok = tiny_tokenizer
    module = model_from_config(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return module, init_params(module, jax.random.PRNGKey(0))


def ids_batch(vocab, seed=0, shape=(2, 7)):
    return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, shape))


def test_adapters_off_is_the_base_and_merge_and_unload_matches(lm):
    module, params = lm
    ids = ids_batch(module.config.vocab_size)
    base = module.apply({"params": params}, ids).logits
    pm = get_peft_model((module, params), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    kernel = flatten_dict(pm.params)[("transformer", "h_0", "attn", "c_attn", "lora_A")]
    assert kernel.shape == (32, 4)  # [in, r] beside the [in, out] kernel
    on = pm.module.apply({"params": pm.params}, ids).logits
    with pm.disable_adapter():
        off = pm.module.apply({"params": pm.params}, ids).logits
    merged_module, merged = pm.merge_and_unload()
    assert np.abs(np.asarray(on - base)).max() > 1e-2  # random B: the adapter does something
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))
    np.testing.assert_allclose(np.asarray(merged_module.apply({"params": merged}, ids).logits), np.asarray(on), atol=1e-5)
    assert set(flatten_dict(merged)) == set(flatten_dict(params))
    # PEFT's default init (B = 0): a fresh adapter is a no-op.
    fresh = get_peft_model((module, params), LoraConfig(r=4))
    np.testing.assert_allclose(np.asarray(fresh.module.apply({"params": fresh.params}, ids).logits), np.asarray(base),
                               atol=1e-6)
    t, a = fresh.get_nb_trainable_parameters()
    assert t == 2 * (32 * 4 + 4 * 96) and a > t  # two layers of c_attn (in 32, out 96)


def test_gradients_reach_only_adapters_and_value_head(lm):
    module, params = lm
    vh = AutoModelForCausalLMWithValueHead.from_lm(module, params)
    pm = get_peft_model(vh, LoraConfig(r=4, init_lora_weights=False, target_modules=["c_attn", "c_fc"]))
    ids = ids_batch(module.config.vocab_size)

    def loss(p):
        out = pm.module.apply({"params": p}, ids)
        return out.logits.mean() + out.values.mean()

    grads = flatten_dict(jax.grad(loss)(pm.params))
    mask = flatten_dict(trainable_mask(pm.params, pm.lora_config))
    assert {"/".join(k) for k, m in mask.items() if m} == {
        f"transformer/h_{i}/{m}/{leaf}" for i in range(2) for m in ("attn/c_attn", "mlp/c_fc") for leaf in ("lora_A", "lora_B")
    } | {"v_head/summary/kernel", "v_head/summary/bias"}
    # The frozen base's kernels and embeddings get no weight gradient at all (stop_gradient).
    for k, g in grads.items():
        if k[-1] in ("kernel", "embedding") and k[0] != "v_head":
            assert not np.any(np.asarray(g)), k
    assert all(np.any(np.asarray(grads[k])) for k, m in mask.items() if m)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_files_load_in_hf_peft_and_back(family, tmp_path):
    """rljax -> PEFT files -> peft.PeftModel on the transformers model: same logits; and an
    adapter made by peft loads in rljax with the same logits (float32, atol 1e-5)."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers

    from rljax.models import from_pretrained

    cfg = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=1, eos_token_id=2),
        "llama": lambda: transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    }[family]()
    targets = None if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf.save_pretrained(tmp_path / "base")
    module, params = from_pretrained(str(tmp_path / "base"))
    ids = np.random.RandomState(0).randint(3, 100, (2, 9))

    ours = get_peft_model((module, params), LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                       init_lora_weights=False), rng=jax.random.PRNGKey(3))
    ours.save_pretrained(str(tmp_path / "ours"))
    fresh_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(fresh_hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours.module.apply({"params": ours.params}, jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    torch.manual_seed(1)
    fresh_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    made = peft.get_peft_model(fresh_hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                         init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        expected = made(torch.tensor(ids)).logits.numpy()
    loaded = PeftModel.from_pretrained((module, params), str(tmp_path / "theirs"))
    got = np.asarray(loaded.module.apply({"params": loaded.params}, jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert loaded.lora_config.r == 2 and loaded.lora_config.scaling == 2.0


def test_lora_config_refuses_what_it_does_not_implement(lm):
    module, params = lm
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(use_dora=True)
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraConfig(rank_pattern={"c_attn": 4})
    with pytest.raises(ValueError, match=r"matches no linear layer.*c_attn"):
        get_peft_model((module, params), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        get_peft_model(get_peft_model((module, params), LoraConfig()), LoraConfig())


# --------------------------------------------------------------------------
# PPO: the reference is the policy with adapters off
# --------------------------------------------------------------------------


def test_ppo_peft_policy_reference_is_adapters_off_without_a_copy(lm, tiny_tokenizer, tmp_path):
    module, params = lm
    policy = get_peft_model(AutoModelForCausalLMWithValueHead.from_lm(module, params),
                            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2)
    trainer = PPOTrainer(config, policy, ref_model=None, tokenizer=tiny_tokenizer)
    assert trainer.ref_model is None and trainer.state.ref_params is None and config.is_peft_model
    # Optimizer state only for the adapters and the value head.
    adam_leaves = [x for x in jax.tree_util.tree_leaves(trainer.state.opt_state) if getattr(x, "ndim", 0) >= 1]
    n_trainable = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(policy.params),
                                                             jax.tree_util.tree_leaves(policy.trainable_mask())) if m)
    assert sum(int(np.prod(x.shape)) for x in adam_leaves) == 2 * n_trainable

    rs = np.random.RandomState(0)
    vocab = len(tiny_tokenizer)
    queries = [rs.randint(3, vocab, n) for n in (3, 5, 2, 6)]
    responses = [rs.randint(3, vocab, n) for n in (4, 3, 6, 5)]
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    stats = trainer.step(queries, responses, [np.float32(s) for s in rs.randn(BATCH)])
    # ref log-probs are the base model's: the plain GPT-2 on the base params.
    q = np.zeros((BATCH, 6), np.int64)
    qm = np.zeros_like(q)
    for i, x in enumerate(queries):
        q[i, 6 - len(x):], qm[i, 6 - len(x):] = x, 1
    ids = np.concatenate([q[0:1, 3:], responses[0][None]], axis=1)  # row 0: query of 3 + response of 4
    logits = module.apply({"params": params}, jnp.asarray(ids)).logits[0]
    expected = jax.nn.log_softmax(logits[2:-1])[np.arange(4), responses[0]]
    ref_lp = np.asarray(stats["objective/ref_logprobs"])[0]  # TRL's [B, T] layout: find the response's values
    assert np.abs(ref_lp[:, None] - np.asarray(expected)[None]).min(axis=0).max() < 1e-4
    policy_lp = np.asarray(stats["objective/logprobs"])[0]  # with adapters on, the policy differs
    assert np.abs(policy_lp[:, None] - np.asarray(expected)[None]).min(axis=0).max() > 1e-3
    moved = changed(trainer.state.params, before)
    assert moved and all(k.endswith(("lora_A", "lora_B")) or k.startswith("v_head") for k in moved)
    assert policy.params is trainer.state.params  # published to the model object, as TRL trains in place
    # generate(generate_ref_response=True): the reference answer is the base model's (adapters off).
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    resp, ref_resp = trainer.generate(queries[:2], return_prompt=False, generate_ref_response=True, **kw)
    base_policy = AutoModelForCausalLMWithValueHead.from_lm(module, params)
    for q_, r_ in zip(queries[:2], ref_resp):
        base = np.asarray(base_policy.generate(jnp.asarray(q_)[None], **kw))[0, len(q_):]
        np.testing.assert_array_equal(np.asarray(r_), base)


# --------------------------------------------------------------------------
# Trainer shells with peft_config=
# --------------------------------------------------------------------------


def test_dpo_peft_reference_is_the_policy_with_adapters_off(lm, tiny_tokenizer, tmp_path):
    from rljax.trainers.dpo import DPOConfig, DPOTrainer

    module, params = lm
    pairs = [{"prompt": "the movie was", "chosen": " great", "rejected": " boring"}] * 4
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", max_length=16, max_prompt_length=8)
    trainer = DPOTrainer((module, params), args=args, train_dataset=pairs, tokenizer=tiny_tokenizer,
                         peft_config=LoraConfig(r=4, init_lora_weights=False))
    assert trainer.ref_params is None
    batch = trainer._pair_batch(trainer.data_collator(trainer.train_dataset[:2]))
    ref_c, ref_r = trainer._reference_logps(trainer._ref_params_now(), batch)
    from rljax.dpo import make_reference_logps_fn

    base_c, base_r = make_reference_logps_fn(module)(params, batch)
    np.testing.assert_allclose(np.asarray(ref_c), np.asarray(base_c), atol=1e-5)
    start = jax.tree_util.tree_map(np.asarray, trainer.params)
    trainer.train()
    moved = changed(trainer.params, start)
    assert moved and all(k.endswith(("lora_A", "lora_B")) for k in moved)
    trainer.save_model(str(tmp_path / "out"))
    config, loaded = load_adapter(str(tmp_path / "out"), params)
    assert config.r == 4 and not changed(loaded, trainer.params)


def test_reward_trainer_seq_cls_adapter_trains_lora_and_score(lm, tiny_tokenizer, tmp_path):
    from rljax.trainers.reward import RewardConfig, RewardTrainer

    module, params = lm
    text = ["the movie was great", "the film was terrible"]
    row = {k + "_" + s: v for s, t in zip(("chosen", "rejected"), text)
           for k, v in tiny_tokenizer(t).items() if k in ("input_ids", "attention_mask")}
    args = RewardConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                        report_to=[], save_strategy="no", max_length=16)
    trainer = RewardTrainer((module, params), args=args, train_dataset=[row] * 4, tokenizer=tiny_tokenizer,
                            peft_config=LoraConfig(r=4, task_type="SEQ_CLS"))
    start = jax.tree_util.tree_map(np.asarray, trainer.params)
    trainer.train()
    moved = changed(trainer.params, start)
    assert "score/kernel" in moved and any(k.endswith("lora_B") for k in moved)
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("score") for k in moved)


# --------------------------------------------------------------------------
# AutoModelForCausalLMWithValueHead.from_pretrained(peft_config=, reward_adapter=, load_in_8bit=)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(lm, tmp_path_factory):
    from rljax.models.hub import save_pretrained

    module, params = lm
    path = str(tmp_path_factory.mktemp("peft_base") / "base")
    save_pretrained(module, params, path)
    return path


@pytest.fixture(scope="module")
def reward_adapter_dir(lm, base_dir, tmp_path_factory):
    """A reward adapter as a RewardTrainer with peft_config (SEQ_CLS) saves it: LoRA on the
    trunk + a 2-label ``score`` head (modules_to_save), in PEFT's files."""
    from rljax.models.heads import SequenceScoreModel, init_score

    module, params = lm
    score_module = SequenceScoreModel(module.config, num_labels=2)
    score_params = {"transformer": params["transformer"], **init_score(score_module, jax.random.PRNGKey(5))}
    rm = get_peft_model((score_module, score_params), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                                 target_modules=["c_attn", "c_proj"],
                                                                 init_lora_weights=False), rng=jax.random.PRNGKey(7))
    path = str(tmp_path_factory.mktemp("peft_rm") / "rm_adapter")
    rm.save_pretrained(path)
    return path, (score_module, score_params)


def _ppo_batch(vocab, seed=0):
    rs = np.random.RandomState(seed)
    queries = [rs.randint(3, vocab, n) for n in (3, 5, 2, 6)]
    responses = [rs.randint(3, vocab, n) for n in (4, 3, 6, 5)]
    return queries, responses, rs


def _right_padded(rows):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


@pytest.mark.slow
def test_ppo_step_scored_by_a_reward_adapter_on_the_same_base(lm, base_dir, reward_adapter_dir, tiny_tokenizer):
    """TRL's ppo_multi_adapter.py: policy adapter + reward adapter (LoRA + score head) on one base.
    compute_reward_score equals the reward model (SequenceScoreModel + that adapter) at each row's
    last token (atol 1e-5); the reward side holds only adapter + head (no second base: the scorer
    takes the policy's params as an argument, its program has no weight constants); a PPO step
    on those scores trains the policy adapter + value head only and leaves the rewards unchanged."""
    from rljax.models.heads import last_token_index
    from rljax.models.peft import make_reward_adapter_scorer

    rm_dir, (score_module, score_params) = reward_adapter_dir
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        base_dir, peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), reward_adapter=rm_dir)
    assert policy.is_peft_model and policy.supports_rm_adapter and policy.rm_adapter_name == "reward_adapter"
    reward_leaves = flatten_dict(policy.reward_adapter_params)
    assert all(k[-1] in ("lora_A", "lora_B") or k[0] == "score" for k in reward_leaves)
    assert reward_leaves[("score", "kernel")].shape == (32, 2)
    assert sum(int(np.prod(v.shape)) for v in reward_leaves.values()) < 0.2 * sum(
        int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(policy.params))

    vocab = len(tiny_tokenizer)
    queries, responses, _ = _ppo_batch(vocab)
    ids, mask = _right_padded([np.concatenate([q, r]) for q, r in zip(queries, responses)])
    raw = np.asarray(policy.compute_reward_score(ids, mask))
    assert raw.shape == ids.shape + (2,)
    last = np.asarray(last_token_index(jnp.asarray(mask)))
    expected_rm = PeftModel.from_pretrained((score_module, score_params), rm_dir)
    expected = expected_rm.module.apply({"params": expected_rm.params}, jnp.asarray(ids), jnp.asarray(mask)).logits
    np.testing.assert_allclose(raw[np.arange(BATCH), last], np.asarray(expected), atol=1e-5)
    jaxpr = jax.make_jaxpr(make_reward_adapter_scorer(policy.module, policy.reward_adapter_config))(
        policy.params, policy.reward_adapter_params, jnp.asarray(ids), jnp.asarray(mask))
    assert sum(int(np.size(c)) for c in jaxpr.consts) < 1000  # weights enter as arguments, not constants

    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2)
    trainer = PPOTrainer(config, policy, ref_model=None, tokenizer=tiny_tokenizer)
    assert trainer.state.ref_params is None
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    scores = [raw[i, last[i], 1] for i in range(BATCH)]  # TRL reads label 1 at the last token
    stats = trainer.step(queries, responses, scores)
    assert np.isfinite(stats["ppo/loss/total"])
    moved = changed(trainer.state.params, before)
    assert moved and all(k.endswith(("lora_A", "lora_B")) or k.startswith("v_head") for k in moved)
    np.testing.assert_allclose(np.asarray(policy.compute_reward_score(ids, mask)), raw, atol=1e-6)


@pytest.mark.slow
def test_qlora_ppo_step_trains_adapters_and_value_head_over_an_int8_base(base_dir, tiny_tokenizer, tmp_path):
    """from_pretrained(..., peft_config=, load_in_8bit=True): the base's linear kernels are int8
    (QuantizedArray); a PPO step (make_ppo_step(..., trainable=)) differentiates and updates only
    the adapters and the value head, keeps Adam state only for them, and leaves every base byte
    (int8 codes, scales, embeddings, norms) exactly as it was."""
    from rljax.models.quant import is_quantized, param_bytes

    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn", "c_fc"])
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(base_dir, peft_config=lora, load_in_8bit=True)
    kernel = policy.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert is_quantized(kernel) and kernel.codes.dtype == jnp.int8
    mask = trainable_mask(policy.params, policy.lora_config)
    frozen_bytes = param_bytes([x for x, m in zip(jax.tree_util.tree_leaves(policy.params),
                                                  jax.tree_util.tree_leaves(mask)) if not m])

    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2)
    trainer = PPOTrainer(config, policy, ref_model=None, tokenizer=tiny_tokenizer)
    n_trainable = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(trainer.state.params),
                                                             jax.tree_util.tree_leaves(mask)) if m)
    adam = [x for x in jax.tree_util.tree_leaves(trainer.state.opt_state) if getattr(x, "ndim", 0) >= 1]
    assert sum(int(np.prod(x.shape)) for x in adam) == 2 * n_trainable
    queries, responses, rs = _ppo_batch(len(tiny_tokenizer), seed=1)
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    stats = trainer.step(queries, responses, [np.float32(s) for s in rs.randn(BATCH)])
    assert np.isfinite(stats["ppo/loss/total"])
    after = trainer.state.params
    leaves = jax.tree_util.tree_flatten_with_path(after)[0]  # QuantizedArray: codes and scale are leaves
    moved = {jax.tree_util.keystr(p) for (p, x), y in zip(leaves, jax.tree_util.tree_leaves(before))
             if np.asarray(x).dtype != y.dtype or not np.array_equal(np.asarray(x), y)}
    trained = {jax.tree_util.keystr(p) for (p, _), m in zip(leaves, jax.tree_util.tree_leaves(mask)) if m}
    assert moved == trained  # every adapter and the value head moved; no base byte did
    assert any("lora_B" in k for k in moved) and any("v_head" in k for k in moved)
    assert param_bytes([x for x, m in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(mask))
                        if not m]) == frozen_bytes
    # TRL's save of a PEFT policy: adapter files + the value head; reloading onto the int8 base restores it all.
    trainer.save_pretrained(str(tmp_path / "saved"))
    again = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "saved"), load_in_8bit=True,
                                                              is_trainable=True)
    reloaded = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(again.params)[0]}
    assert set(reloaded) == {jax.tree_util.keystr(p) for p, _ in leaves}
    for p, x in leaves:
        np.testing.assert_array_equal(reloaded[jax.tree_util.keystr(p)], np.asarray(x))


def test_sft_with_frozen_adapters_only_is_refused(lm, tiny_tokenizer, tmp_path):
    """A PEFT model whose adapters are frozen (inference_mode=True) would train nothing: refused."""
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    module, params = lm
    frozen = get_peft_model((module, params), LoraConfig(r=4, inference_mode=True))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     save_strategy="no")
    with pytest.raises(ValueError, match="no trainable parameters.*is_trainable=True"):
        SFTTrainer(frozen, args=args, train_dataset=[{"text": "the movie was great"}] * 4,
                   tokenizer=tiny_tokenizer, dataset_text_field="text", max_seq_length=16)
