"""Encoder-decoder paths of the trainer shells on a tiny T5 (v1.0 layout).

PPO: one ``PPOTrainer.step`` on T5 equals a torch transcription of TRL 0.7.11's step
(``batched_forward_pass`` with ``is_encoder_decoder``: logits over the decoder ids, masks
``1 .. len - 2``; compute_rewards, compute_advantages, loss) on the same weights.

DPO: the loss, TRL's eight metrics and the gradient of ``DPOTrainer``'s step on T5 equal a
torch transcription of TRL 0.7.11's encoder-decoder DPO (prompt -> encoder, labels -> decoder
via ``labels=``, ``get_batch_logps`` without the shift) on the same weights, for a batch padded
wider than TRL pads it; with and without a reference model, for every loss type.

Iterative SFT: one ``IterativeSFTTrainer.step`` on T5 (SGD, one minibatch) moves the params by
exactly ``-lr *`` the gradient of transformers' seq2seq loss (labels -> decoder targets).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rljax.models.auto import AutoModelForSeq2SeqLM, AutoModelForSeq2SeqLMWithValueHead
from rljax.ppo import PPOConfig
from rljax.trainers.base import TrainingArguments
from rljax.trainers.dpo import DPOConfig, DPOTrainer
from rljax.trainers.ppo import PPOTrainer

VOCAB = 64
CFG = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
           relative_attention_num_buckets=8, relative_attention_max_distance=20)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**CFG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("t5_trainers")
    model.save_pretrained(path)
    return str(path)


def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


def _masked_whiten(x, m):
    mean = _masked_mean(x, m)
    var = _masked_mean((x - mean) ** 2, m) * m.sum() / (m.sum() - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def trl_encoder_decoder_step_stats(path, v_weight, v_bias, queries, responses, scores, config):
    """TRL 0.7.11's PPO step statistics for an encoder-decoder, first (and only) minibatch, in torch."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    pad = 0
    q = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in queries], batch_first=True, padding_value=pad)
    qm = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in queries], batch_first=True)
    d = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in responses], batch_first=True, padding_value=pad)
    dm = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in responses], batch_first=True)
    with torch.no_grad():
        out = model(input_ids=q, attention_mask=qm, decoder_input_ids=d, decoder_attention_mask=dm,
                    output_hidden_states=True)
        logits = out.logits
        values = (out.decoder_hidden_states[-1] @ torch.tensor(np.asarray(v_weight)).T + torch.tensor(np.asarray(v_bias)))[..., 0]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, d[:, 1:, None])[..., 0]
    masks = torch.zeros_like(dm)
    masks[:, :-1] = dm[:, 1:]
    for j in range(len(queries)):
        masks[j, :1] = 0
        masks[j, dm[j].sum() - 1:] = 0
    masks = masks[:, :-1].float()
    values = values[:, :-1]
    logits = logits[:, :-1]
    # compute_rewards: the reference equals the policy, so KL = 0 and the score sits at the last masked position
    rewards = torch.zeros_like(logp)
    for j in range(len(queries)):
        rewards[j, masks[j].nonzero()[-1]] += scores[j]
    # compute_advantages
    values, rewards = values * masks, rewards * masks
    lastgaelam, adv_rev = 0, []
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + config.gamma * nextvalues - values[:, t]
        lastgaelam = delta + config.gamma * config.lam * lastgaelam
        adv_rev.append(lastgaelam)
    advantages = torch.stack(adv_rev[::-1]).T
    returns = advantages + values
    advantages = _masked_whiten(advantages, masks)
    # loss at ratio 1 (first minibatch of the first epoch: the params have not moved yet)
    vf_losses = (values - returns) ** 2
    vf_loss = 0.5 * _masked_mean(vf_losses, masks)
    pg_loss = _masked_mean(-advantages, masks)
    ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    return {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": pg_loss + config.vf_coef * vf_loss,
        "ppo/policy/entropy": _masked_mean(ent, masks), "ppo/returns/mean": _masked_mean(returns, masks),
        "ppo/val/mean": _masked_mean(values, masks), "ppo/val/error": _masked_mean(vf_losses, masks),
        "objective/kl": torch.tensor(0.0), "ppo/mean_scores": torch.tensor(np.mean(scores)),
        "tokens/responses_len_mean": torch.tensor(np.mean([len(r) for r in responses]), dtype=torch.float32),
    }


def test_ppo_step_on_t5_matches_trl_encoder_decoder_transcription(t5_dir):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(t5_dir, summary_dropout_prob=0.0)
    v_weight, v_bias = np.asarray(model.v_head.summary.weight), np.asarray(model.v_head.summary.bias)
    rs = np.random.RandomState(0)
    queries = [rs.randint(2, VOCAB, n).astype(np.int32) for n in (6, 4)]
    responses = [np.concatenate([[0], rs.randint(2, VOCAB, n - 1)]).astype(np.int32) for n in (5, 4)]
    scores = [1.0, -0.5]
    config = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3)
    trainer = PPOTrainer(config, model)
    assert trainer.is_encoder_decoder and config.is_encoder_decoder
    before = jax.tree.map(np.asarray, model.params)
    stats = trainer.step(queries, responses, scores)
    expected = trl_encoder_decoder_step_stats(t5_dir, v_weight, v_bias, queries, responses, scores, config)
    for key, value in expected.items():
        np.testing.assert_allclose(stats[key], float(value), atol=1e-5, rtol=1e-5, err_msg=key)
    moved = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), model.params, before)
    assert all(jax.tree.leaves(moved["v_head"])) and any(jax.tree.leaves(moved["decoder"]))


def test_ppo_on_t5_refuses_mesh_and_shared_layers_when_built(t5_dir):
    """What encoder-decoder PPO does not support is refused by the constructor, naming it, not
    at the first step after a generation."""
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(t5_dir, summary_dropout_prob=0.0)
    config = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    with pytest.raises(ValueError, match="Encoder-decoder PPO runs without .*got mesh="):
        PPOTrainer(config, model, mesh=mesh)
    with pytest.raises(ValueError, match="Encoder-decoder PPO runs without .*got num_shared_layers"):
        PPOTrainer(config, model, num_shared_layers=1)


def test_ppo_generate_returns_decoder_outputs_like_transformers(t5_dir):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(t5_dir, summary_dropout_prob=0.0)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), model)
    rs = np.random.RandomState(3)
    queries = [rs.randint(2, VOCAB, n).astype(np.int32) for n in (7, 3)]
    outs = trainer.generate(queries, batch_size=2, do_sample=False, max_new_tokens=6)
    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    for q, got in zip(queries, outs):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor(q)[None], do_sample=False, max_new_tokens=6).numpy()[0]
        eos = np.nonzero(ref == 1)[0]
        ref = ref[: eos[0] + 1] if len(eos) else ref  # TRL's remove_padding keeps up to the first eos
        np.testing.assert_array_equal(got, ref)
        assert got[0] == 0  # the decoder start token


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
               "logps/chosen", "logits/rejected", "logits/chosen")


def _dpo_rows(seed=0, n=3):
    """TRL encoder-decoder token rows: prompt (encoder) and chosen/rejected labels ending in eos (1)."""
    rs = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        rows.append({
            "prompt_input_ids": list(rs.randint(2, VOCAB, 3 + 2 * (i % 4))) + [1],
            "chosen_labels": list(rs.randint(2, VOCAB, 2 + i % 4)) + [1],
            "rejected_labels": list(rs.randint(2, VOCAB, 5 - i % 4)) + [1],
        })
        rows[-1]["prompt_attention_mask"] = [1] * len(rows[-1]["prompt_input_ids"])
    return rows


def _trl_collate(rows):
    """TRL's DPODataCollatorWithPadding(is_encoder_decoder=True): right padding, per-key widths."""
    pad = torch.nn.utils.rnn.pad_sequence
    out = {}
    for k, value in (("prompt_input_ids", 0), ("prompt_attention_mask", 0), ("chosen_labels", -100),
                     ("rejected_labels", -100)):
        out[k] = pad([torch.tensor(r[k]) for r in rows], batch_first=True, padding_value=value)
    return out


def trl_encoder_decoder_dpo(path, rows, beta=0.1, loss_type="sigmoid", ref_path=None):
    """TRL 0.7.11's get_batch_loss_metrics for an encoder-decoder, in torch: (loss, metrics, grads)."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    ref = transformers.T5ForConditionalGeneration.from_pretrained(ref_path or path).eval()
    batch = _trl_collate(rows)
    n = len(rows)
    width = max(batch["chosen_labels"].shape[1], batch["rejected_labels"].shape[1])
    labels = torch.cat([torch.nn.functional.pad(batch[k], (0, width - batch[k].shape[1]), value=-100)
                        for k in ("chosen_labels", "rejected_labels")])
    ids, mask = batch["prompt_input_ids"].repeat(2, 1), batch["prompt_attention_mask"].repeat(2, 1)

    def forward(m):
        logits = m(ids, attention_mask=mask, labels=labels, decoder_input_ids=None, use_cache=False).logits
        loss_mask = labels != -100
        per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
        logps = (per_token * loss_mask).sum(-1)
        if loss_type == "ipo":
            logps = logps / loss_mask.sum(-1)
        return logps[:n], logps[n:], logits[:n], logits[n:]

    pc, pr, lc, lr = forward(model)
    with torch.no_grad():
        rc, rr, _, _ = forward(ref)
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # kto_pair
        chosen_kl = (pc - rc).mean().clamp(min=0)
        rejected_kl = (pr - rr).mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(beta * ((pc - rc) - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - (pr - rr)))), 0)
    cr, rjr = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    loss = losses.mean()
    loss.backward()
    metrics = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rjr.mean(), "rewards/accuracies": (cr > rjr).float().mean(),
        "rewards/margins": (cr - rjr).mean(), "logps/rejected": pr.detach().mean(), "logps/chosen": pc.detach().mean(),
        "logits/rejected": lr.detach().mean(), "logits/chosen": lc.detach().mean(),
    }
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads


class _IdTokenizer:
    """Stands in for a tokenizer where rows are already token ids (pad 0, eos 1, as T5)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**CFG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("t5_ref")
    model.save_pretrained(path)
    return str(path)


def _dpo_trainer(t5_dir, tmp_path, ref=None, **kw):
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_length=64, max_prompt_length=16,
                     max_target_length=16, remove_unused_columns=False, disable_tqdm=True, **kw)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    ref_model = AutoModelForSeq2SeqLM.from_pretrained(ref) if ref else None
    return DPOTrainer(model, ref_model, args=args, tokenizer=_IdTokenizer())


@pytest.mark.parametrize("loss_type, with_ref", [("sigmoid", False), ("hinge", True), ("ipo", False), ("kto_pair", True)])
def test_dpo_step_on_t5_matches_trl_encoder_decoder_transcription(t5_dir, ref_dir, tmp_path, loss_type, with_ref):
    trainer = _dpo_trainer(t5_dir, tmp_path, ref_dir if with_ref else None, loss_type=loss_type)
    assert trainer.is_encoder_decoder
    rows = _dpo_rows()
    batch = trainer.collate(rows)  # our bucketed (wider) padding, reference log-probs added
    assert batch["chosen_labels"].shape[1] > max(len(r["chosen_labels"]) for r in rows)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    grads = jax.jit(jax.grad(lambda p, b: trainer.loss_fn(p, b, None)[0]))(
        trainer.params, {k: jnp.asarray(v) for k, v in batch.items()})
    ref_loss, ref_metrics, ref_grads = trl_encoder_decoder_dpo(t5_dir, rows, loss_type=loss_type,
                                                               ref_path=ref_dir if with_ref else None)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    for key in DPO_METRICS:
        if key == "rewards/accuracies" and not with_ref:  # policy == reference: rewards are 0 up to rounding
            assert abs(ref_metrics["rewards/margins"]) < 1e-6
            continue
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
    pairs = {"shared.weight": grads["shared"]["embedding"],
             "encoder.block.0.layer.0.SelfAttention.q.weight": grads["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"].T,
             "decoder.block.1.layer.1.EncDecAttention.o.weight": grads["decoder"]["block_1"]["layer_1"]["EncDecAttention"]["o"]["kernel"].T,
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                 grads["decoder"]["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"]}
    for name, got in pairs.items():
        np.testing.assert_allclose(np.asarray(got), ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # TRL's own layouts (its collator's per-key widths; concatenated_inputs) give the same numbers
    trl_batch = {k: v.numpy() for k, v in _trl_collate(rows).items()}
    rc, rr = trainer.compute_reference_log_probs(trl_batch)
    np.testing.assert_allclose(rc, batch["reference_chosen_logps"], rtol=1e-5)
    cat = trainer.concatenated_inputs(trl_batch, is_encoder_decoder=True)
    assert cat["concatenated_input_ids"].shape[0] == 2 * len(rows)
    pc, pr, chosen_logits, _ = trainer.concatenated_forward(trainer.model, cat)
    np.testing.assert_allclose(float(np.mean(pc)), ref_metrics["logps/chosen"], rtol=1e-5)
    assert chosen_logits.shape[:2] == cat["concatenated_labels"][: len(rows)].shape




@pytest.mark.slow
def test_dpo_trainer_on_t5_runs_sharded_on_a_data_fsdp_mesh(t5_dir, ref_dir, tmp_path):
    """DPOTrainer(mesh=data 2 x fsdp 4) on T5: the policy's and the reference's params are split on
    fsdp and the first step's loss equals the single-device loss on the same batch."""
    from rljax.sharding import make_mesh

    rows = _dpo_rows(seed=3, n=8)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, max_length=64,
                     max_prompt_length=16, max_target_length=16, remove_unused_columns=False, disable_tqdm=True,
                     logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), AutoModelForSeq2SeqLM.from_pretrained(ref_dir),
                         args=args, tokenizer=_IdTokenizer(), mesh=make_mesh(data=2, fsdp=4))
    expected, _ = _dpo_trainer(t5_dir, tmp_path / "one", ref_dir).get_batch_loss_metrics(None, _trl_collate_np(rows))
    trainer.train_dataset = rows
    trainer.train()
    kernel = trainer.train_state.params["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wi"]["kernel"]
    assert "fsdp" in tuple(kernel.sharding.spec)
    ref_kernel = trainer.ref_params["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wi"]["kernel"]
    assert "fsdp" in tuple(ref_kernel.sharding.spec)
    first = next(h for h in trainer.state.log_history if "loss" in h)
    np.testing.assert_allclose(first["loss"], float(expected), rtol=1e-4)


def _trl_collate_np(rows):
    return {k: v.numpy() for k, v in _trl_collate(rows).items()}

# --------------------------------------------------------------------------------------------
# Iterative SFT
# --------------------------------------------------------------------------------------------


def test_iterative_sft_step_on_t5_is_sgd_on_transformers_seq2seq_loss(t5_dir, tmp_path):
    from rljax.trainers.iterative_sft import IterativeSFTTrainer

    rs = np.random.RandomState(5)
    inputs = [rs.randint(2, VOCAB, n) for n in (5, 3, 7)]
    labels = [np.concatenate([rs.randint(2, VOCAB, n), [1]]) for n in (2, 4, 1)]
    loaded = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    # dropout off (the torch side runs in eval mode): the same computation, no random masks
    module = loaded.module.clone(config=dataclasses.replace(loaded.module.config, dropout_rate=0.0))
    before = jax.tree.map(np.asarray, loaded.params)
    lr = 0.5
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, optim="sgd",
                             learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=None, weight_decay=0.0)
    trainer = IterativeSFTTrainer((module, loaded.params), args, tokenizer=_IdTokenizer())
    assert trainer.is_encoder_decoder
    stats = trainer.step(input_ids=inputs, labels=labels)
    assert stats["num_updates"] == 1 and stats["num_tokens"] == sum(len(x) for x in labels)

    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([torch.tensor(x) for x in inputs], batch_first=True, padding_value=0)
    mask = pad([torch.ones(len(x), dtype=torch.long) for x in inputs], batch_first=True)
    lab = pad([torch.tensor(x) for x in labels], batch_first=True, padding_value=-100)
    out = torch_model(input_ids=ids, attention_mask=mask, labels=lab)
    out.loss.backward()
    np.testing.assert_allclose(stats["loss"], float(out.loss.detach()), rtol=1e-5)
    grads = dict(torch_model.named_parameters())
    after = trainer.params
    moved = {"shared.weight": after["shared"]["embedding"] - before["shared"]["embedding"],
             "decoder.block.1.layer.2.DenseReluDense.wo.weight":
                 (after["decoder"]["block_1"]["layer_2"]["DenseReluDense"]["wo"]["kernel"]
                  - before["decoder"]["block_1"]["layer_2"]["DenseReluDense"]["wo"]["kernel"]).T,
             "encoder.block.0.layer.1.DenseReluDense.wi.weight":
                 (after["encoder"]["block_0"]["layer_1"]["DenseReluDense"]["wi"]["kernel"]
                  - before["encoder"]["block_0"]["layer_1"]["DenseReluDense"]["wi"]["kernel"]).T}
    for name, delta in moved.items():
        np.testing.assert_allclose(np.asarray(delta), -lr * grads[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="'labels' or 'text_labels' must be passed"):
        trainer.step(input_ids=inputs)
