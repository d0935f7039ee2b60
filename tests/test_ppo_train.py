"""rljax.ppo_train: one jitted PPO step against TRL 0.7.11's math in PyTorch, and the
behaviours around it (gradient accumulation, ratio_threshold skips, early stopping,
non-finite scores, KL control, gradient clipping, learning with ``make_train``).

The ``_trl_*`` helpers restate TRL 0.7.11's ``PPOTrainer.step`` in torch float32 (as
TRL runs it): RIGHT-padded ``[query | response]`` inputs, ``batched_forward_pass``'s
start/end masks, ``compute_rewards``, ``compute_advantages``, the PPO loss and
``torch.optim.Adam``. The model is a transformers ``GPT2LMHeadModel`` plus an
``nn.Linear`` value head holding the same weights as the rljax model. rljax lays the
batch out differently (left-padded query | right-padded response), so only quantities
on masked positions are comparable position by position.

Every distinct ``PPOConfig`` is one XLA compilation (seconds on CPU), so the configs
below are few and each serves several tests.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers

from rljax.data import pad_sequences
from rljax.generation import make_generate_fn
from rljax.models import init_params, model_from_config
from rljax.models.gpt2 import GPT2Config
from rljax.models.heads import AutoModelForCausalLMWithValueHead
from rljax.models.hub import family_of, params_to_state_dict
from rljax.ppo import PPOConfig
from rljax.ppo_train import PPOTrainState, make_forward_rollout, make_ppo_step, make_train

VOCAB, PAD = 48, 0
HF_CONFIG = dict(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
# float32 on both sides: stats agree to ~1e-6 relative; these leave a margin.
STAT_RTOL, STAT_ATOL = 1e-5, 1e-6
PARAM_ATOL = 1e-5  # params after one Adam step
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7  # Adam's first moment after one step (= 0.1 * grad)

SCALAR_KEYS = [
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores",
    "ppo/std_scores", "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/responses_len_mean",
    "tokens/responses_len_std", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy",
    "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean",
    "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean",
    "ppo/val/var", "ppo/val/var_explained",
]
VECTOR_KEYS = ["objective/kl_dist", "tokens/queries_dist", "tokens/responses_dist"]

# One batch with queries AND responses of different lengths, so padding is exercised.
RS = np.random.RandomState(0)
QUERIES = [RS.randint(3, VOCAB, n) for n in (3, 5, 2, 4)]
RESPONSES = [RS.randint(3, VOCAB, n) for n in (4, 2, 5, 3)]
SCORES = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
# Equal response lengths: per-minibatch masked means then average exactly like one big batch.
EQUAL_RESPONSES = [RS.randint(3, VOCAB, 3) for _ in range(4)]

BASE = dict(batch_size=4, mini_batch_size=4, ppo_epochs=1, init_kl_coef=0.2, seed=0)
CONFIGS = {
    # kl penalty, adaptive controller below target; also the baseline of the GA, clipping and skip tests
    "kl": BASE,
    # score scaling + normalisation + clip, whitened rewards, fixed controller
    "scaled": dict(BASE, use_score_scaling=True, use_score_norm=True, score_clip=1.2, whiten_rewards=True,
                   adap_kl_ctrl=False),
    # exact KL from full distributions; an adaptive controller ABOVE its target
    "full": dict(BASE, kl_penalty="full", target=1e-3, horizon=100),
    "ga": dict(BASE, mini_batch_size=2, gradient_accumulation_steps=2),
    "ratio": dict(BASE, mini_batch_size=2, ppo_epochs=2, ratio_threshold=1e-3),
    "early": dict(BASE, mini_batch_size=2, ppo_epochs=3, learning_rate=1e-2, early_stopping=True, target_kl=1e-6),
    "early_baseline": dict(BASE, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2),
    "clip": dict(BASE, max_grad_norm=1e-3),
}


def config_of(name):
    return PPOConfig(**CONFIGS[name])


# --------------------------------------------------------------------------
# Models: a transformers GPT-2 pair (policy, perturbed reference) saved to disk,
# loaded by rljax; the torch side reloads the same directories.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    policy = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
    with torch.no_grad():
        for p, r in zip(policy.parameters(), ref.parameters()):
            p.add_(0.1 * torch.randn_like(p))
            r.copy_(p + 0.05 * torch.randn_like(p))  # a nearby reference: non-zero KL
    dirs = {}
    for name, m in (("policy", policy), ("ref", ref)):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        m.save_pretrained(dirs[name])
    pol = AutoModelForCausalLMWithValueHead.from_pretrained(dirs["policy"], summary_dropout_prob=0.0)
    ref_vh = AutoModelForCausalLMWithValueHead.from_pretrained(dirs["ref"], summary_dropout_prob=0.0)
    return dict(module=pol.module, params=pol.params, ref_params=ref_vh.params, dirs=dirs, variant="plain")


@pytest.fixture(scope="module")
def dropout_models(models, tmp_path_factory):
    """The same weights with GPT-2's default dropouts (0.1) in the LM and the value head.
    TRL 0.7.11 runs every PPO forward pass in eval mode, so the numbers must not change."""
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(models["dirs"]["policy"])
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(torch_model.config, key, 0.1)
    path = str(tmp_path_factory.mktemp("policy_dropout"))
    torch_model.save_pretrained(path)
    pol = AutoModelForCausalLMWithValueHead.from_pretrained(path, summary_dropout_prob=0.1)
    assert pol.module.lm.config.resid_pdrop == 0.1
    pol.params["v_head"] = models["params"]["v_head"]
    return dict(models, module=pol.module, params=pol.params, dirs=dict(models["dirs"], policy=path),
                variant="dropout")


_JITTED = {}


def jitted(models, name):
    """One compiled ``ppo_step`` per config name (and one forward per kl mode), shared by tests."""
    key = (name, models["variant"])
    if key not in _JITTED:
        _JITTED[key] = jax.jit(make_ppo_step(models["module"], config_of(name)))
    return _JITTED[key]


def rollout_for(models, config, queries=QUERIES, responses=RESPONSES):
    key = ("forward", config.kl_penalty, models["variant"])
    if key not in _JITTED:
        _JITTED[key] = jax.jit(make_forward_rollout(models["module"], config.kl_penalty))
    q = pad_sequences(queries, PAD, "left")
    qm = pad_sequences([np.ones(len(x)) for x in queries], 0, "left")
    r = pad_sequences(responses, PAD, "right")
    rm = pad_sequences([np.ones(len(x)) for x in responses], 0, "right")
    return _JITTED[key](models["params"], models["ref_params"], q, qm, r, rm)


def fresh_state(models, name):
    """A fresh state (the config's default optimizer, as the jitted step's)."""
    return PPOTrainState.create(models["params"], models["ref_params"], config_of(name))


def run_step(models, name, scores=SCORES, queries=QUERIES, responses=RESPONSES, state=None):
    config = config_of(name)
    if state is None:
        state = fresh_state(models, name)
    rollout = rollout_for(models, config, queries, responses)
    new_state, stats = jitted(models, name)(state, rollout, jnp.asarray(scores))
    return state, new_state, jax.device_get(stats), rollout


def adam_state(opt_state):
    """The (only) ScaleByAdamState in an optax state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1
    return found[0]


def adam_first_moment(opt_state):
    return adam_state(opt_state).mu


def as_state_dict(models, params):
    return params_to_state_dict(params, family_of(models["module"].config))


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# --------------------------------------------------------------------------
# TRL 0.7.11's PPOTrainer.step, transcribed in torch (float32, as TRL runs)
# --------------------------------------------------------------------------


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _masked_var(x, mask, unbiased=True):
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def _masked_whiten(x, mask, shift_mean=True):
    mean, var = _masked_mean(x, mask), _masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _logprobs_from_logits(logits, labels=None):
    logp = F.log_softmax(logits, dim=2)
    return logp if labels is None else torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


def _entropy_from_logits(logits):
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


class _TorchValueHeadModel(torch.nn.Module):
    """transformers GPT-2 + ``v_head.summary`` Linear(hidden, 1): TRL's value-head model, dropout 0."""

    def __init__(self, directory, v_head):
        super().__init__()
        self.lm = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
        self.summary = torch.nn.Linear(self.lm.config.n_embd, 1)
        with torch.no_grad():
            self.summary.weight.copy_(torch.tensor(np.asarray(v_head["summary"]["kernel"]).T))
            self.summary.bias.copy_(torch.tensor(np.asarray(v_head["summary"]["bias"])))

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.summary(out.hidden_states[-1]).squeeze(-1)


def _trl_batched_forward_pass(model, queries, responses, input_ids, attention_mask, fbs, return_logits=False):
    model.eval()  # TRL 0.7.11 puts the model in eval mode for EVERY forward pass, training ones included
    all_logprobs, all_logits, all_values, all_masks = [], [], [], []
    for i in range(math.ceil(len(queries) / fbs)):
        sl = slice(i * fbs, (i + 1) * fbs)
        ids, am = input_ids[sl], attention_mask[sl]
        logits, values = model(ids, am)
        logprobs = _logprobs_from_logits(logits[:, :-1, :], ids[:, 1:])
        masks = torch.zeros_like(am)
        masks[:, :-1] = am[:, 1:]
        for j, (q, r) in enumerate(zip(queries[sl], responses[sl])):
            start = len(q) - 1
            if am[j, 0] == 0:  # left padding (never, with TRL's right-padding collator)
                start += am[j, :].nonzero()[0]
            end = start + len(r)
            masks[j, :start] = 0
            masks[j, end:] = 0
        all_logits.append(logits)
        all_values.append(values)
        all_logprobs.append(logprobs)
        all_masks.append(masks)
    return (torch.cat(all_logprobs), torch.cat(all_logits)[:, :-1] if return_logits else None,
            torch.cat(all_values)[:, :-1], torch.cat(all_masks)[:, :-1])


class _TrlRunningMoments:
    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs):
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot = self.count + xs.numel()
        new_sum = xs_var * xs.numel()
        old_sum = self.var * self.count + delta**2 * self.count * xs.numel() / tot
        tot_sum = old_sum + new_sum
        self.mean += delta * xs.numel() / tot
        self.var = tot_sum / tot
        self.std = (self.var * tot / (tot - 1)).float().sqrt()
        self.count = tot


def _trl_kl_penalty(logprob, ref_logprob, mode):
    if mode == "kl":
        return logprob - ref_logprob
    if mode == "abs":
        return (logprob - ref_logprob).abs()
    if mode == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    return F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)


def _trl_loss(c, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
    vpredclipped = torch.max(torch.min(vpreds, values + c.cliprange_value), values - c.cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * _masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = _masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - c.cliprange, 1.0 + c.cliprange)
    pg_loss = _masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)
    loss = pg_loss + c.vf_coef * vf_loss
    if _masked_mean(ratio, mask).item() > c.ratio_threshold:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
        "policy/entropy": _masked_mean(_entropy_from_logits(logits), mask),
        "policy/approxkl": 0.5 * _masked_mean((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": _masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac, "policy/advantages_mean": _masked_mean(advantages, mask),
        "returns/mean": _masked_mean(returns, mask), "returns/var": _masked_var(returns, mask),
        "val/vpred": _masked_mean(vpreds, mask), "val/error": _masked_mean((vpreds - returns) ** 2, mask),
        "val/clipfrac": vf_clipfrac, "val/mean": _masked_mean(values, mask), "val/var": _masked_var(values, mask),
    }
    return pg_loss, c.vf_coef * vf_loss, {k: v.detach() for k, v in stats.items()}


def trl_step(c, models, queries, responses, scores, seed=0):
    """TRL 0.7.11 ``PPOTrainer.step`` on torch copies of the rljax weights.

    Returns (stats, policy state dict after the step, Adam exp_avg by name, kl coef after update,
    torch masks [B, T-1] of the right-padded layout, logprobs, ref_logprobs).
    """
    v_head = models["params"]["v_head"]
    model = _TorchValueHeadModel(models["dirs"]["policy"], v_head)
    ref = _TorchValueHeadModel(models["dirs"]["ref"], models["ref_params"]["v_head"])
    named = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
    np.random.seed(seed)
    queries = [torch.tensor(q) for q in queries]
    responses = [torch.tensor(r) for r in responses]
    scores = torch.tensor(np.asarray(scores), dtype=torch.float32)
    bs = len(queries)

    if c.use_score_scaling:
        moments = _TrlRunningMoments()
        moments.update(scores)
        factor = moments.std + torch.finfo(scores.dtype).eps
        scores = (scores - moments.mean) / factor if c.use_score_norm else scores / factor
    if c.score_clip is not None:
        scores = torch.clip(scores.float(), -c.score_clip, c.score_clip)

    # DataCollatorForLanguageModeling: right-padded [query | response]
    seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    L = max(len(s) for s in seqs)
    input_ids = torch.full((bs, L), PAD, dtype=torch.long)
    attention_mask = torch.zeros((bs, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1

    full = c.kl_penalty == "full"
    with torch.no_grad():
        logprobs, logits, values, masks = _trl_batched_forward_pass(
            model, queries, responses, input_ids, attention_mask, c.mini_batch_size, return_logits=full)
        ref_logprobs, ref_logits, _, _ = _trl_batched_forward_pass(
            ref, queries, responses, input_ids, attention_mask, c.mini_batch_size, return_logits=full)
        kl_coef = c.init_kl_coef
        lp, ref_lp = (_logprobs_from_logits(logits), _logprobs_from_logits(ref_logits)) if full else (logprobs, ref_logprobs)
        rewards, non_score, kls = [], [], []
        for score, a, b, mask in zip(scores, lp, ref_lp, masks):
            kl = _trl_kl_penalty(a, b, c.kl_penalty)
            kls.append(kl)
            nsr = -kl_coef * kl
            non_score.append(nsr)
            reward = nsr.clone()
            reward[mask.nonzero()[-1]] += score
            rewards.append(reward)
        rewards, non_score, kls = torch.stack(rewards), torch.stack(non_score), torch.stack(kls)

        # compute_advantages
        vals, rew = values * masks, rewards * masks
        if c.whiten_rewards:
            rew = _masked_whiten(rew, masks, shift_mean=False)
        lastgaelam, rev = 0, []
        T = rew.shape[-1]
        for t in reversed(range(T)):
            nextvalues = vals[:, t + 1] if t < T - 1 else 0.0
            delta = rew[:, t] + c.gamma * nextvalues - vals[:, t]
            lastgaelam = delta + c.gamma * c.lam * lastgaelam
            rev.append(lastgaelam)
        advantages = torch.stack(rev[::-1]).transpose(0, 1)
        returns = advantages + vals
        advantages = _masked_whiten(advantages, masks).detach()

    all_stats, early_stop = [], False
    for _ in range(c.ppo_epochs):
        if early_stop:
            break
        b_inds = np.random.permutation(bs)
        for bb_start in range(0, bs, c.backward_batch_size):
            bb_inds = b_inds[bb_start : bb_start + c.backward_batch_size]
            for k, mb_start in enumerate(range(0, c.backward_batch_size, c.mini_batch_size)):
                idx = bb_inds[mb_start : mb_start + c.mini_batch_size]
                new_lp, new_logits, vpreds, _ = _trl_batched_forward_pass(
                    model, [queries[i] for i in idx], [responses[i] for i in idx], input_ids[idx],
                    attention_mask[idx], c.mini_batch_size, return_logits=True)
                model.train()
                pg, vf, st = _trl_loss(c, logprobs[idx], vals[idx], new_logits, vpreds, new_lp, masks[idx],
                                       advantages[idx], returns[idx])
                ((pg + vf) / c.gradient_accumulation_steps).backward()  # accelerate's GA scaling
                if k == c.gradient_accumulation_steps - 1:  # sync_gradients
                    if c.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                    opt.step()
                    opt.zero_grad()
                all_stats.append(st)
        if c.early_stopping and all_stats[-1]["policy/policykl"] > 1.5 * c.target_kl:
            early_stop = True

    stats = {f"ppo/{k}": torch.stack([s[k] for s in all_stats]).mean(0).item() for k in all_stats[0]}
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    kl_list = (kls * masks).sum(-1)
    qlen = torch.tensor([len(q) for q in queries], dtype=torch.float)
    rlen = torch.tensor([len(r) for r in responses], dtype=torch.float)
    stats.update({
        "objective/kl": kl_list.mean().item(), "objective/kl_dist": kl_list.numpy(), "objective/kl_coef": kl_coef,
        "objective/entropy": (-logprobs * masks).sum(-1).mean().item(),
        "ppo/mean_non_score_reward": _masked_mean(non_score, masks).item(),
        "ppo/mean_scores": scores.mean().item(), "ppo/std_scores": scores.std().item(),
        "tokens/queries_len_mean": qlen.mean().item(), "tokens/queries_len_std": qlen.std().item(),
        "tokens/queries_dist": qlen.numpy(), "tokens/responses_len_mean": rlen.mean().item(),
        "tokens/responses_len_std": rlen.std().item(), "tokens/responses_dist": rlen.numpy(),
        "ppo/epochs_run": float(len(all_stats) // (bs // c.mini_batch_size)),
    })
    new_kl = kl_coef
    if c.adap_kl_ctrl:  # AdaptiveKLController.update(objective/kl, batch_size)
        err = np.clip(stats["objective/kl"] / c.target - 1, -0.2, 0.2)
        new_kl = kl_coef * (1 + err * bs / c.horizon)
    sd = {("transformer." + k[len("lm.transformer."):] if k.startswith("lm.transformer.") else k): v.detach().numpy()
          for k, v in model.state_dict().items()}
    sd["v_head.summary.weight"], sd["v_head.summary.bias"] = sd.pop("summary.weight"), sd.pop("summary.bias")
    sd.pop("lm.lm_head.weight")  # tied to transformer.wte.weight
    exp_avg = {n: opt.state[p]["exp_avg"].numpy() for n, p in named.items() if p in opt.state}
    return dict(stats=stats, state_dict=sd, exp_avg=exp_avg, kl_coef=new_kl, masks=masks.numpy(),
                logprobs=logprobs.numpy(), ref_logprobs=ref_logprobs.numpy())


def _torch_name(n):
    if n.startswith("lm.transformer."):
        return "transformer." + n[len("lm.transformer."):]
    return {"summary.weight": "v_head.summary.weight", "summary.bias": "v_head.summary.bias"}.get(n, n)


def _response_values(arr, lengths, offsets):
    """Row-major values of ``arr`` [B, T] at each row's response positions ``offset .. offset+len-1``."""
    return np.concatenate([np.asarray(arr)[i, o : o + n] for i, (o, n) in enumerate(zip(offsets, lengths))])


# --------------------------------------------------------------------------
# 1. Parity with TRL 0.7.11
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kl", "scaled", "full"])
def test_ppo_step_matches_trl_0_7_11_math(request, name):
    """One full step vs TRL. The "full" case also runs with dropout 0.1 in the model (as GPT-2's
    default config): TRL's PPO forward passes are all in eval mode, and so are ours."""
    models = request.getfixturevalue("dropout_models" if name == "full" else "models")
    config = config_of(name)
    state, new_state, stats, rollout = run_step(models, name)
    ref = trl_step(config, models, QUERIES, RESPONSES, SCORES)
    want = ref["stats"]

    for key in SCALAR_KEYS:
        np.testing.assert_allclose(stats[key], want[key], rtol=STAT_RTOL, atol=STAT_ATOL, err_msg=key)
    for key in VECTOR_KEYS:  # per-row sums of logprob differences: float32 cancellation, ~1e-6 absolute
        np.testing.assert_allclose(stats[key], want[key], rtol=STAT_RTOL, atol=1e-5, err_msg=key)
    assert stats["ppo/epochs_run"] == 1 and stats["ppo/minibatches_skipped"] == 0
    assert stats["ppo/learning_rate"] == pytest.approx(config.learning_rate)
    assert abs(stats["objective/kl"]) > 1e-3  # the reference really differs: the KL term is exercised

    # Per-token quantities: the same response positions in both layouts.
    rlen = [len(r) for r in RESPONSES]
    assert rollout.logprobs.shape == rollout.responses.shape  # [B, N]: the response window only
    ours_off, trl_off = [0] * 4, [len(q) - 1 for q in QUERIES]
    np.testing.assert_array_equal(_response_values(ref["masks"], rlen, trl_off), 1)
    assert ref["masks"].sum() == np.asarray(rollout.masks).sum() == sum(rlen)
    for key in ("logprobs", "ref_logprobs"):
        np.testing.assert_allclose(_response_values(stats[f"objective/{key}"], rlen, ours_off),
                                   _response_values(ref[key], rlen, trl_off), rtol=1e-5, atol=1e-5, err_msg=key)

    # KL controller after the step: adaptive below target (down), above target (up), fixed.
    np.testing.assert_allclose(float(new_state.kl.value), ref["kl_coef"], rtol=1e-6)
    if name == "kl":
        assert float(new_state.kl.value) < config.init_kl_coef
    elif name == "full":
        assert float(new_state.kl.value) > config.init_kl_coef
    else:
        assert float(new_state.kl.value) == np.float32(config.init_kl_coef)

    # Gradients (Adam's first moment = 0.1 * grad after one step) and params after the step.
    mu = as_state_dict(models, adam_first_moment(new_state.opt_state))
    ours = as_state_dict(models, new_state.params)
    exp_avg = {_torch_name(k): v for k, v in ref["exp_avg"].items()}
    assert set(mu) == set(exp_avg) == set(ours) - {"lm_head.weight"}
    for k in mu:
        scale = np.abs(exp_avg[k]).max()
        np.testing.assert_allclose(mu[k], exp_avg[k], rtol=GRAD_RTOL, atol=GRAD_ATOL + 1e-5 * scale, err_msg=k)
        np.testing.assert_allclose(ours[k], ref["state_dict"][k], rtol=0, atol=PARAM_ATOL, err_msg=k)
    before = as_state_dict(models, state.params)
    assert max(np.abs(ours[k] - before[k]).max() for k in ours) > 0.5 * config.learning_rate  # params moved


# --------------------------------------------------------------------------
# 2. Behaviours of the step
# --------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_bigger_minibatch(models):
    """GA=2 x mini_batch 2 gives the same update as mini_batch 4 (equal response lengths,
    so the per-minibatch masked means average to the big batch's)."""
    _, one, stats_one, _ = run_step(models, "kl", responses=EQUAL_RESPONSES)
    _, ga, stats_ga, _ = run_step(models, "ga", responses=EQUAL_RESPONSES)
    mu_one, mu_ga = adam_first_moment(one.opt_state), adam_first_moment(ga.opt_state)
    for a, b in zip(jax.tree_util.tree_leaves(mu_one), jax.tree_util.tree_leaves(mu_ga)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(ga.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert int(adam_state(one.opt_state).count) == int(adam_state(ga.opt_state).count) == 1  # one optimizer update each
    np.testing.assert_allclose(stats_ga["ppo/loss/total"], stats_one["ppo/loss/total"], rtol=1e-5, atol=1e-7)
    # And TRL does the same with GA=2 (accelerate scaling, one optimizer step).
    ref = trl_step(config_of("ga"), models, QUERIES, EQUAL_RESPONSES, SCORES)
    ours = as_state_dict(models, ga.params)
    for k, v in ref["state_dict"].items():
        np.testing.assert_allclose(ours[k], v, rtol=0, atol=PARAM_ATOL, err_msg=k)


def test_ratio_threshold_skips_every_minibatch_without_touching_state(models):
    state, new_state, stats, _ = run_step(models, "ratio")
    assert stats["ppo/minibatches_skipped"] == 4  # 2 epochs x 2 minibatches
    assert stats["ppo/epochs_run"] == 2
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total"):
        assert stats[key] == 0.0
    assert stats["ppo/policy/approxkl"] == 0.0  # nothing moved between minibatches either
    # Deliberate fix (TRL steps Adam on zero grads for a skipped batch): params AND Adam state bitwise unchanged (TRL steps Adam).
    assert leaves_equal(new_state.params, state.params)
    assert leaves_equal(new_state.opt_state, state.opt_state)
    assert int(new_state.step) == int(state.step) + 1


def test_early_stopping_runs_one_epoch_and_averages_only_it(models):
    _, stopped, stats, _ = run_step(models, "early")
    _, one_epoch, stats_one, _ = run_step(models, "early_baseline")
    assert stats["ppo/policy/policykl"] > 1.5 * config_of("early").target_kl  # the trigger
    assert stats["ppo/epochs_run"] == 1
    for key in SCALAR_KEYS:  # the two not-run epochs are not averaged in
        np.testing.assert_allclose(stats[key], stats_one[key], rtol=1e-6, atol=1e-8, err_msg=key)
    assert leaves_equal(stopped.params, one_epoch.params)
    # TRL stops after the same single epoch.
    ref = trl_step(config_of("early"), models, QUERIES, RESPONSES, SCORES)
    assert ref["stats"]["ppo/epochs_run"] == 1


def test_nonfinite_scores_leave_the_state_untouched(models):
    scores = SCORES.copy()
    scores[2] = np.nan
    state, new_state, stats, _ = run_step(models, "kl", scores=scores)
    assert stats["ppo/skipped_nonfinite_scores"] == 1.0
    for field in ("params", "ref_params", "opt_state", "kl", "score_moments"):
        assert leaves_equal(getattr(new_state, field), getattr(state, field)), field
    assert int(new_state.step) == 1 and not np.array_equal(new_state.rng, state.rng)
    # Scaled scores: an inf must not reach the running moments either.
    scores[2] = np.inf
    state, new_state, stats, _ = run_step(models, "scaled", scores=scores)
    assert stats["ppo/skipped_nonfinite_scores"] == 1.0
    assert leaves_equal(new_state.score_moments, state.score_moments)
    assert leaves_equal(new_state.params, state.params)
    assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(new_state.params))


def test_kl_controller_over_several_steps(models):
    """Adaptive: the coefficient moves toward the target each step (here the KL is below target:
    it shrinks by exactly 1 - 0.2 * B / horizon); fixed: it never moves."""
    state = fresh_state(models, "kl")
    values = [float(state.kl.value)]
    for _ in range(3):
        _, state, stats, _ = run_step(models, "kl", state=state)
        assert stats["objective/kl"] < config_of("kl").target
        values.append(float(state.kl.value))
    np.testing.assert_allclose(np.array(values[1:]) / values[:-1], 1 - 0.2 * 4 / 10000, rtol=1e-6)
    fixed = fresh_state(models, "scaled")
    for _ in range(2):
        _, fixed, _, _ = run_step(models, "scaled", state=fixed)
    assert float(fixed.kl.value) == np.float32(config_of("scaled").init_kl_coef)


def test_max_grad_norm_clips_the_gradient(models):
    """With max_grad_norm the update sees the gradient rescaled to that global norm (read back
    from Adam's first moment, 0.1 * grad); without it, the raw gradient. The clipped step also
    matches TRL's clip_grad_norm_ + Adam."""
    _, plain, _, _ = run_step(models, "kl")
    _, clipped, _, _ = run_step(models, "clip")
    g = jax.tree_util.tree_map(lambda m: m / 0.1, adam_first_moment(plain.opt_state))
    g_clip = jax.tree_util.tree_map(lambda m: m / 0.1, adam_first_moment(clipped.opt_state))
    norm = float(optax.global_norm(g))
    max_norm = config_of("clip").max_grad_norm
    assert norm > 10 * max_norm
    assert float(optax.global_norm(g_clip)) == pytest.approx(max_norm, rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_clip)):
        np.testing.assert_allclose(b, a * max_norm / norm, rtol=1e-4, atol=1e-12)
    ref = trl_step(config_of("clip"), models, QUERIES, RESPONSES, SCORES)
    mu = as_state_dict(models, adam_first_moment(clipped.opt_state))
    for k, v in ref["exp_avg"].items():
        np.testing.assert_allclose(mu[_torch_name(k)], v, rtol=GRAD_RTOL, atol=1e-10, err_msg=k)


# --------------------------------------------------------------------------
# 3. Learning: the whole loop as one compiled function
# --------------------------------------------------------------------------

TARGET_TOKENS = jnp.array([3, 4, 5, 6])


def count_target_tokens(rollout):
    """A JAX reward: how many response tokens are in TARGET_TOKENS (about 0.5 of 8 at random)."""
    hits = jnp.isin(rollout.responses, TARGET_TOKENS) & (rollout.response_mask > 0)
    return hits.sum(-1).astype(jnp.float32)


@pytest.mark.slow
def test_make_train_learns_a_token_counting_reward_for_two_seeds_at_once():
    """``jax.jit(jax.vmap(make_train(...)))``: two seeds, 12 PPO iterations each (generate 8
    tokens for 32 prompts, score, 4 epochs x 4 minibatches), one compilation."""
    vocab = 64
    lm = model_from_config(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2))
    model = AutoModelForCausalLMWithValueHead.from_lm(lm, init_params(lm, jax.random.PRNGKey(0)),
                                                      summary_dropout_prob=0.0)
    config = PPOConfig(batch_size=32, mini_batch_size=8, ppo_epochs=4, learning_rate=1e-3, seed=0)
    prompts = np.random.RandomState(0).randint(7, vocab, (64, 4)).astype(np.int32)
    generate_fn = make_generate_fn(model.module, max_new_tokens=8, do_sample=True, pad_token_id=PAD, jit=False)
    train = make_train(model.module, config, generate_fn, lambda _, rollout: count_target_tokens(rollout), 12)
    state = PPOTrainState.create(model.params, model.params, config)
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), state, state.replace(rng=jax.random.PRNGKey(1)))
    # seeds batched, the (reward params, prompt bank) arguments shared
    final, stats = jax.jit(jax.vmap(train, in_axes=(0, None, None, None)))(states, None, prompts, np.ones_like(prompts))

    reward = np.asarray(stats["env/reward_mean"])  # [2 seeds, 12 steps]
    kl = np.asarray(stats["objective/kl"])
    assert reward.shape == (2, 12)
    first, last = reward[:, :5].mean(1), reward[:, -5:].mean(1)
    assert np.all(last > first + 1.5), reward
    assert np.all(np.abs(kl) < 20), kl
    assert np.all(np.isfinite(np.asarray(stats["ppo/loss/total"])))
    assert not np.array_equal(reward[0], reward[1])  # the seeds really differ
    assert np.all(np.asarray(final.step) == 12)
    assert np.all(np.asarray(stats["objective/kl_coef"])[:, -1] < 0.2)  # adaptive: KL below target 6 early on


def test_the_optimizer_belongs_to_the_step_so_new_states_do_not_recompile(models):
    """``PPOTrainState`` holds no optax object (all leaves): states created with fresh optimizer
    objects of equal settings run through one jitted ``ppo_step`` without a recompile."""
    from rljax.ppo_train import make_ppo_optimizer

    config = config_of("kl")
    step = jitted(models, "kl")
    a = PPOTrainState.create(models["params"], models["ref_params"], config, tx=make_ppo_optimizer(config))
    b = PPOTrainState.create(models["params"], models["ref_params"], config, tx=make_ppo_optimizer(config))
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(a))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    rollout = rollout_for(models, config)
    step(a, rollout, jnp.asarray(SCORES))
    size = step._cache_size()
    step(b, rollout, jnp.asarray(SCORES))
    assert step._cache_size() == size


def test_make_train_takes_reward_params_and_prompt_bank_as_arguments(models):
    """Large things are arguments: a 4096-prompt bank and a reward table passed to ``train``
    leave no bank- or table-sized constant in the lowered program (closing over them would
    bake both in); prompts are drawn epoch-wise from the bank."""
    import re

    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, seed=0)
    bank = np.random.RandomState(1).randint(3, VOCAB, (4096, 3)).astype(np.int32)
    reward_table = np.linspace(-1, 1, VOCAB).astype(np.float32)  # "reward model params"

    def reward_fn(table, rollout):
        return jnp.sum(table[rollout.responses] * rollout.response_mask, axis=-1)

    gen = make_generate_fn(models["module"], max_new_tokens=3, pad_token_id=PAD, jit=False)
    train = make_train(models["module"], config, gen, reward_fn, 2)
    state = PPOTrainState.create(models["params"], models["ref_params"], config)
    text = jax.jit(train).lower(state, reward_table, bank, np.ones_like(bank)).as_text()
    constants = re.findall(r"stablehlo\.constant dense<.*?> : tensor<([\dx]+)x\w+>", text)
    sizes = [math.prod(int(d) for d in c.split("x")) for c in constants]
    assert not sizes or max(sizes) < 1024, max(sizes)
    assert len(text) < 2_000_000


def test_make_train_draws_each_prompt_once_per_epoch(models):
    """16 prompts, batch 4: 4 iterations are one epoch, so every prompt is used exactly once
    (the summed first tokens of the sampled queries equal the bank's)."""
    config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, seed=0)
    bank = np.stack([np.arange(3, 19), np.full(16, 5)], axis=1).astype(np.int32)

    def first_token(_, rollout):
        return rollout.queries[:, 0].astype(jnp.float32)

    gen = make_generate_fn(models["module"], max_new_tokens=2, pad_token_id=PAD, jit=False)
    train = jax.jit(make_train(models["module"], config, gen, first_token, 4))
    state = PPOTrainState.create(models["params"], models["ref_params"], config)
    _, stats = train(state, None, bank, np.ones_like(bank))
    assert float(np.sum(np.asarray(stats["env/reward_mean"]) * 4)) == float(bank[:, 0].sum())
