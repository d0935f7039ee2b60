"""rljax.dpo: DPOTrainer learns preferences, every loss type trains, precomputed reference
log-probs equal on-the-fly ones, the loss and metrics equal a torch transcription of TRL
0.7.11's DPO on transformers' GPT-2, and bad configurations fail with clear errors.

Tiny GPT-2 (2 layers, 32 wide, no dropout) over the character-level session tokenizer.
"""
import copy
import random

import jax
import numpy as np
import pytest

from rljax.dpo import get_batch_logps
from rljax.losses import get_batch_logps as losses_get_batch_logps
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.trainers.dpo import DPOConfig, DPOTrainer

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "box"]
METRIC_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/rejected", "logps/chosen", "logits/rejected", "logits/chosen",
}


def tiny_model(tokenizer, seed=0):
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    module = model_from_config(cfg)
    return module, init_params(module, jax.random.PRNGKey(seed))


def pairs(n, seed):
    rng = random.Random(seed)
    return [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(3)), "chosen": " good " + rng.choice(WORDS),
         "rejected": " bad " + rng.choice(WORDS)}
        for _ in range(n)
    ]


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=2e-3, max_steps=30, logging_steps=10, logging_first_step=True, save_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant", seed=0, max_length=48, max_prompt_length=24,
        remove_unused_columns=False,
    )
    base.update(kw)
    return DPOConfig(**base)


def flat(params):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, model, tmp_path_factory):
    """A sigmoid-loss run with an on-the-fly reference (the initial policy)."""
    tmp = tmp_path_factory.mktemp("dpo")
    trainer = DPOTrainer(model, args=config(tmp), train_dataset=pairs(32, 0), eval_dataset=pairs(16, 1), tokenizer=tiny_tokenizer)
    before = trainer.evaluate()
    trainer.train()
    return trainer, before, trainer.evaluate()


def test_get_batch_logps_is_the_losses_one():
    assert get_batch_logps is losses_get_batch_logps


def test_dpo_raises_reward_accuracy_and_margins(trained, model):
    trainer, before, after = trained
    assert {k[len("eval_"):] for k in after if k.startswith("eval_")} == METRIC_KEYS | {
        "loss", "runtime", "samples_per_second", "steps_per_second"}
    assert after["epoch"] == 30 / 8  # HF: evaluate() after training reports the epoch reached
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert before["eval_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert after["eval_rewards/accuracies"] >= 0.9, after
    assert after["eval_rewards/margins"] > 1.0, after
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    train_logs = [h for h in trainer.log_history if "rewards/margins" in h]
    assert {"loss", "grad_norm", "learning_rate", "step"} <= set(train_logs[-1])
    assert train_logs[-1]["rewards/margins"] > train_logs[0]["rewards/margins"]
    # the reference stayed the initial policy, the policy moved
    np.testing.assert_array_equal(flat(trainer.ref_params), flat(model[1]))
    assert not np.allclose(flat(trainer.params), flat(model[1]))


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "kto_pair"])
def test_each_loss_type_trains(tiny_tokenizer, model, tmp_path, loss_type):
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=2, logging_steps=1), loss_type=loss_type,
                         train_dataset=pairs(8, 0), tokenizer=tiny_tokenizer)
    assert trainer.args.loss_type == loss_type
    out = trainer.train()
    assert np.isfinite(out["loss"]) and METRIC_KEYS <= set(out)
    assert not np.allclose(flat(trainer.params), flat(model[1]))


def test_precomputed_reference_logps_give_the_same_first_step(trained, tiny_tokenizer, model, tmp_path):
    on_the_fly = trained[0]
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=1), precompute_ref_log_probs=True,
                         train_dataset=pairs(32, 0), tokenizer=tiny_tokenizer)
    out = trainer.train()
    assert all("reference_chosen_logps" in r and "reference_rejected_logps" in r for r in trainer.train_dataset)
    first = next(h for h in on_the_fly.log_history if h.get("step") == 1)
    for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
        assert out[k] == pytest.approx(first[k], rel=1e-5, abs=1e-6), k
    # the precomputed column equals the reference forward of the collated batch
    row = trainer.train_dataset[0]
    batch = on_the_fly.collate([{k: v for k, v in row.items() if not k.startswith("reference_")}])
    assert float(batch["reference_chosen_logps"][0]) == pytest.approx(row["reference_chosen_logps"], rel=1e-5)


def test_loss_and_metrics_match_torch_transcription_of_trl(tiny_tokenizer, model, tmp_path):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    from rljax.models import save_pretrained

    module, params = model
    ref = tiny_model(tiny_tokenizer, seed=7)
    beta = 0.3
    trainer = DPOTrainer(model, ref_model=ref, beta=beta, args=config(tmp_path), train_dataset=pairs(4, 5), tokenizer=tiny_tokenizer)
    batch = trainer.collate(trainer.train_dataset[:4])
    loss, metrics = jax.jit(trainer.loss_fn)(params, batch, None)

    save_pretrained(module, params, str(tmp_path / "policy"))
    save_pretrained(ref[0], ref[1], str(tmp_path / "ref"))
    policy_t = GPT2LMHeadModel.from_pretrained(str(tmp_path / "policy")).eval()
    ref_t = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ref")).eval()

    # TRL pads the concatenated batch to its longest row only.
    width = int(max(batch["chosen_attention_mask"].sum(1).max(), batch["rejected_attention_mask"].sum(1).max()))
    cat = {k: torch.tensor(np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])[:, :width], dtype=torch.long)
           for k in ("input_ids", "attention_mask", "labels")}

    def trl_get_batch_logps(logits, labels):  # TRL 0.7.11 DPOTrainer.get_batch_logps, decoder-only
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
        loss_mask = labels != -100
        labels[labels == -100] = 0
        per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1)

    with torch.no_grad():
        logits = policy_t(cat["input_ids"], attention_mask=cat["attention_mask"]).logits
        ref_logits = ref_t(cat["input_ids"], attention_mask=cat["attention_mask"]).logits
    logps, ref_logps = trl_get_batch_logps(logits, cat["labels"]), trl_get_batch_logps(ref_logits, cat["labels"])
    pc, pr, rc, rr = logps[:4], logps[4:], ref_logps[:4], ref_logps[4:]
    h = (pc - pr) - (rc - rr)
    trl_loss = (-F.logsigmoid(beta * h)).mean()
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    expected = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": pr.mean(), "logps/chosen": pc.mean(),
        "logits/rejected": logits[4:].mean(), "logits/chosen": logits[:4].mean(),
    }
    assert abs(float(trl_loss) - np.log(2)) > 1e-3  # a real reference, not the policy
    np.testing.assert_allclose(float(loss), float(trl_loss), rtol=1e-4, atol=1e-5)
    for k, v in expected.items():
        np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-4, atol=1e-5, err_msg=k)


def test_dpo_configuration_errors(tiny_tokenizer, model, tmp_path):
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        DPOTrainer(model, args=config(tmp_path), train_dataset=pairs(4, 0), tokenizer=no_pad)
    with pytest.raises(ValueError, match="generate_during_eval"):
        DPOTrainer(model, args=config(tmp_path), generate_during_eval=True, train_dataset=pairs(4, 0), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="rejected"):
        DPOTrainer(model, args=config(tmp_path), train_dataset=[{"prompt": "a", "chosen": "b"}], tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="loss_type"):
        DPOTrainer(model, args=config(tmp_path), loss_type="nope", train_dataset=pairs(4, 0), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="second PEFT adapter"):
        DPOTrainer(model, args=config(tmp_path), peft_config={"r": 8}, ref_adapter_name="ref", train_dataset=pairs(4, 0),
                   tokenizer=tiny_tokenizer)
    with pytest.warns(UserWarning) as record:
        trainer = DPOTrainer(model, args=config(tmp_path, max_length=None, max_prompt_length=None), tokenizer=tiny_tokenizer)
    assert any("512" in str(w.message) for w in record) and any("128" in str(w.message) for w in record)
    assert (trainer.args.max_length, trainer.args.max_prompt_length) == (512, 128)
    # keyword arguments win over the config, and the config passed in is not mutated
    args = config(tmp_path, beta=0.5)
    trainer = DPOTrainer(model, args=args, beta=0.2, tokenizer=tiny_tokenizer)
    assert trainer.args.beta == 0.2 and args.beta == 0.5


def test_trl_method_names_give_the_train_step_numbers(trained):
    trainer = trained[0]
    batch = trainer.collate(trainer.train_dataset[:4])
    ref_loss, ref_metrics = jax.jit(trainer.loss_fn)(trainer.params, batch, None)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="eval")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(float(ref_metrics["rewards/margins"]), rel=1e-5)
    pc, pr, chosen_logits, _ = trainer.concatenated_forward(trainer.model, batch)
    assert chosen_logits.shape[0] == 4
    losses, _, _ = trainer.dpo_loss(pc, pr, batch["reference_chosen_logps"], batch["reference_rejected_logps"])
    assert float(np.mean(losses)) == pytest.approx(float(ref_loss), rel=1e-5)
    # TRL's collated layout (chosen and rejected padded separately) works too
    rc, rr = trainer.compute_reference_log_probs(trainer.data_collator(trainer.train_dataset[:4]))
    np.testing.assert_allclose(rc, batch["reference_chosen_logps"], rtol=1e-5)
    np.testing.assert_allclose(rr, batch["reference_rejected_logps"], rtol=1e-5)


def test_the_head_on_the_completion_columns_gives_the_full_head_numbers(trained, model):
    """Collated batches carry ``*_completion_positions``: the policy's and the reference's LM head
    run on those columns only (no ``[2B, L, V]`` logits in the traced loss), for a plain model, a
    LoRA model and a value-head model, with the numbers of the head on every column."""
    from rljax.dpo import (
        _POSITION_KEYS,
        add_completion_positions,
        make_dpo_loss,
        make_reference_logps_fn,
    )
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.models.peft import LoraConfig, get_peft_model

    module, params = model
    collated = trained[0].collate(trained[0].train_dataset[:4])
    assert set(_POSITION_KEYS) <= set(collated)
    full = {k: v for k, v in collated.items() if k not in _POSITION_KEYS}
    batch = add_completion_positions(full, pad_to_multiple_of=8)  # the trainer's bucket (64) is the whole row here
    L, W = full["chosen_input_ids"].shape[1], batch["chosen_completion_positions"].shape[1]
    assert W < L - 1
    lora = get_peft_model((module, params), LoraConfig(r=2, init_lora_weights=False))
    vh = AutoModelForCausalLMWithValueHead.from_lm(module, params, rng=jax.random.PRNGKey(1))
    for mod, p in ((module, params), (lora.module, lora.params), (vh.module, vh.params)):
        loss_fn = make_dpo_loss(mod, beta=0.2)
        (loss, metrics), (want, want_metrics) = loss_fn(p, batch, None), loss_fn(p, full, None)
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
        for k in want_metrics:
            np.testing.assert_allclose(float(metrics[k]), float(want_metrics[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        full_logits = f"f32[8,{L},{mod.config.vocab_size}]"
        assert full_logits not in str(jax.make_jaxpr(lambda q: loss_fn(q, batch, None))(p))
        if mod is module:
            assert full_logits in str(jax.make_jaxpr(lambda q: loss_fn(q, full, None))(p))
            ref = make_reference_logps_fn(mod)
            np.testing.assert_allclose(np.asarray(ref(p, batch)), np.asarray(ref(p, full)), rtol=1e-6)
