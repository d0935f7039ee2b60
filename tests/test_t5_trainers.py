"""Encoder-decoder paths of the trainer shells on a tiny T5 (v1.0 layout).

PPO: one ``PPOTrainer.step`` on T5 equals a torch transcription of TRL 0.7.11's step
(``batched_forward_pass`` with ``is_encoder_decoder``: logits over the decoder ids, masks
``1 .. len - 2``; compute_rewards, compute_advantages, loss) on the same weights.
"""
import jax
import numpy as np
import pytest
import torch
import transformers

from rljax.models.auto import AutoModelForSeq2SeqLMWithValueHead
from rljax.ppo import PPOConfig
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
