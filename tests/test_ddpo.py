"""rljax.ddpo: the DDIM step with log-prob against a torch transcription of TRL 0.7.11's
``scheduler_step``, the scan sampler, the per-prompt stat tracker, the loss and the inner epoch."""
import math
from collections import deque
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.ddpo import (
    PerPromptStatTracker,
    compute_loss,
    ddim_step_with_logprob,
    ddpo_loss,
    make_sample_fn,
)
from rljax.diffusion.schedulers import DDIMSchedulerConfig, make_ddim_schedule

torch = pytest.importorskip("torch")


# -- a torch transcription of TRL 0.7.11's scheduler_step (trl/models/modeling_sd_base.py) --------
def _torch_scheduler(config: DDIMSchedulerConfig, num_inference_steps: int):
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    else:
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return SimpleNamespace(
        alphas_cumprod=ac,
        final_alpha_cumprod=torch.tensor(1.0) if config.set_alpha_to_one else ac[0],
        num_inference_steps=num_inference_steps,
        config=config,
    )


def _bcast(x, shape):
    return x.reshape(x.shape + (1,) * (len(shape) - x.ndim)).broadcast_to(shape)


def _torch_step(self, model_output, timestep, sample, eta, prev_sample=None, noise=None):
    prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, self.config.num_train_timesteps - 1)
    a_t = self.alphas_cumprod.gather(0, timestep)
    a_prev = torch.where(prev_timestep >= 0, self.alphas_cumprod.gather(0, prev_timestep), self.final_alpha_cumprod)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    a_t, a_prev = _bcast(a_t, sample.shape), _bcast(a_prev, sample.shape)
    b_t = 1 - a_t
    if self.config.prediction_type == "epsilon":
        x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        eps = model_output
    else:  # v_prediction
        x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
        eps = (a_t**0.5) * model_output + (b_t**0.5) * sample
    if self.config.clip_sample:
        x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
    std = _bcast(eta * variance**0.5, sample.shape)
    direction = (1 - a_prev - std**2) ** 0.5 * eps
    mean = a_prev**0.5 * x0 + direction
    if prev_sample is None:
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * (std**2)) - torch.log(std) - torch.log(
        torch.sqrt(2 * torch.as_tensor(np.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


CONFIGS = [
    DDIMSchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1),  # Stable Diffusion's
    DDIMSchedulerConfig(),  # diffusers' defaults (clip_sample=True)
    DDIMSchedulerConfig(prediction_type="v_prediction", clip_sample=False),
]


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ddim_step_with_logprob_matches_trl_scheduler_step(ci, eta):
    config = CONFIGS[ci]
    steps = 10
    schedule = make_ddim_schedule(config, steps)
    ts = _torch_scheduler(config, steps)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ts.alphas_cumprod.numpy(), rtol=1e-6)
    rng = np.random.default_rng(ci)
    b, shape = 3, (3, 4, 5, 2)
    out = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    t = np.asarray(schedule.timesteps)[rng.integers(0, steps, b)]
    t[0] = int(schedule.timesteps[-1])  # the last step (prev timestep clamped to 0)
    noise = rng.standard_normal(shape).astype(np.float32)
    # drawing: same noise -> same prev_sample and log-prob
    key = jax.random.PRNGKey(0)
    prev_j, lp_j = ddim_step_with_logprob(schedule, jnp.asarray(out), jnp.asarray(t), jnp.asarray(x), eta, key=key)
    noise_j = np.asarray(jax.random.normal(key, shape, jnp.float32))
    prev_t, lp_t = _torch_step(ts, torch.tensor(out), torch.tensor(t), torch.tensor(x), eta, noise=torch.tensor(noise_j))
    np.testing.assert_allclose(np.asarray(prev_j), prev_t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp_j), lp_t.numpy(), rtol=1e-5, atol=1e-5)
    # scoring a given prev_sample
    prev = rng.standard_normal(shape).astype(np.float32) * 0.1 + prev_t.numpy()
    _, lp_j = ddim_step_with_logprob(schedule, jnp.asarray(out), jnp.asarray(t), jnp.asarray(x), eta,
                                     prev_sample=jnp.asarray(prev))
    _, lp_t = _torch_step(ts, torch.tensor(out), torch.tensor(t), torch.tensor(x), eta, prev_sample=torch.tensor(prev))
    np.testing.assert_allclose(np.asarray(lp_j), lp_t.numpy(), rtol=1e-5, atol=1e-5)
    del noise


def test_ddim_step_needs_exactly_one_of_key_or_prev_sample():
    s = make_ddim_schedule(DDIMSchedulerConfig(), 5)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="exactly one"):
        ddim_step_with_logprob(s, x, jnp.array([1, 1]), x, 1.0)


def test_log_prob_gradient_flows_to_model_output_not_prev_sample():
    s = make_ddim_schedule(DDIMSchedulerConfig(clip_sample=False), 5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    prev = jax.random.normal(jax.random.PRNGKey(2), (2, 4))
    t = s.timesteps[:2]
    g_out, g_prev = jax.grad(lambda o, p: ddim_step_with_logprob(s, o, t, x, 1.0, prev_sample=p)[1].sum(),
                             argnums=(0, 1))(x * 0.5, prev)
    assert np.abs(np.asarray(g_out)).sum() > 0
    assert np.abs(np.asarray(g_prev)).sum() == 0


def test_schedule_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for config in CONFIGS + [DDIMSchedulerConfig(timestep_spacing="trailing"), DDIMSchedulerConfig(timestep_spacing="linspace")]:
        d = diffusers.DDIMScheduler(**{k: v for k, v in config.to_dict().items() if k != "_class_name"})
        d.set_timesteps(7)
        s = make_ddim_schedule(config, 7)
        np.testing.assert_array_equal(np.asarray(s.timesteps), d.timesteps.numpy())
        np.testing.assert_allclose(np.asarray(s.alphas_cumprod), d.alphas_cumprod.numpy(), rtol=1e-6)
        np.testing.assert_allclose(float(s.final_alpha_cumprod), float(d.final_alpha_cumprod), rtol=1e-6)


def test_eta_zero_mean_matches_diffusers_step():
    """With eta -> 0 the drawn sample is diffusers' deterministic DDIM step (a step, not a
    final step: TRL clamps the previous timestep, diffusers uses final_alpha_cumprod at t < 0)."""
    diffusers = pytest.importorskip("diffusers")
    config = CONFIGS[0]
    d = diffusers.DDIMScheduler(**{k: v for k, v in config.to_dict().items() if k != "_class_name"})
    d.set_timesteps(10)
    s = make_ddim_schedule(config, 10)
    rng = np.random.default_rng(0)
    out, x = (rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for _ in range(2))
    t = int(s.timesteps[3])
    ref = d.step(torch.tensor(out), t, torch.tensor(x), eta=0.0).prev_sample.numpy()
    got, _ = ddim_step_with_logprob(s, jnp.asarray(out), jnp.array([t]), jnp.asarray(x), 1e-6, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


# -- TRL's PerPromptStatTracker (trl/trainer/utils.py), transcribed for comparison -----------------
class _TrlTracker:
    def __init__(self, buffer_size, min_count):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.array(rewards)
        adv = np.empty_like(rewards)
        for p in np.unique(prompts):
            pr = rewards[prompts == p]
            self.stats.setdefault(p, deque(maxlen=self.buffer_size)).extend(pr)
            if len(self.stats[p]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(self.stats[p]), np.std(self.stats[p]) + 1e-6
            adv[prompts == p] = (pr - mean) / std
        return adv


@pytest.mark.parametrize("buffer_size,min_count", [(4, 3), (16, 16), (3, 1)])
def test_per_prompt_stat_tracker_matches_trl(buffer_size, min_count):
    rng = np.random.default_rng(buffer_size)
    ref = _TrlTracker(buffer_size, min_count)
    tracker = PerPromptStatTracker.create(2, buffer_size, min_count)
    update = jax.jit(lambda tr, p, r: tr.update(p, r))
    for it in range(6):
        ids = rng.integers(0, 3, 8) if it != 2 else np.zeros(8, np.int64)  # 8 > buffer: deque keeps the last ones
        rewards = rng.standard_normal(8).astype(np.float32)
        want = ref.update([f"p{i}" for i in ids], rewards)
        tracker = tracker.grow(3)
        tracker, adv = update(tracker, jnp.asarray(ids, jnp.int32), jnp.asarray(rewards))
        np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-4, atol=1e-4)
    stats = tracker.get_stats()
    for i in range(3):
        if f"p{i}" in ref.stats:
            np.testing.assert_allclose(stats[i]["mean"], np.mean(ref.stats[f"p{i}"]), rtol=1e-5, atol=1e-6)
            assert stats[i]["count"] == len(ref.stats[f"p{i}"])


def test_ddpo_loss_is_trls():
    # TRL's test_loss: advantage -1, clip range 1e-4, ratio 1 -> 1.0
    assert float(ddpo_loss(jnp.array([-1.0]), 0.0001, jnp.array([1.0]))) == 1.0
    adv, ratio = jnp.array([1.0, -1.0, 2.0]), jnp.array([1.5, 1.5, 0.5])
    want = np.mean(np.maximum(-np.asarray(adv) * np.asarray(ratio),
                              -np.asarray(adv) * np.clip(np.asarray(ratio), 0.8, 1.2)))
    np.testing.assert_allclose(float(ddpo_loss(adv, 0.2, ratio)), want, rtol=1e-6)


def _toy_unet(params, x, t, emb):
    """A linear 'denoiser' for the math tests: x * w + mean(emb) * v + t / 1000."""
    return x * params["w"] + emb.mean(axis=(1, 2)).reshape((-1,) + (1,) * (x.ndim - 1)) * params["v"] + \
        (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))


def test_sampler_log_probs_rescore_to_themselves_and_guidance():
    # steps_offset=1: the last step goes 1 -> 0 (at t=0 TRL's clamped step has zero variance)
    schedule = make_ddim_schedule(DDIMSchedulerConfig(clip_sample=False, steps_offset=1), 6)
    params = {"w": jnp.float32(0.3), "v": jnp.float32(0.5)}
    sample = make_sample_fn(_toy_unet, (4, 4, 1), guidance_scale=3.0, eta=1.0)
    emb = jnp.ones((2, 3, 5))
    neg = jnp.zeros((2, 3, 5))
    out = sample(params, schedule, emb, neg, jax.random.PRNGKey(0))
    assert out.latents.shape == (2, 7, 4, 4, 1)
    assert out.log_probs.shape == (2, 6) and out.timesteps.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(out.timesteps[0]), np.asarray(schedule.timesteps))
    # rescoring each transition under the same params gives ratio 1 (TRL's on-policy first step)
    for j in range(6):
        loss, (kl, cf) = compute_loss(_toy_unet, params, schedule, out.latents[:, j], out.timesteps[:, j],
                                      out.latents[:, j + 1], out.log_probs[:, j], jnp.array([1.0, -1.0]), emb, neg,
                                      guidance_scale=3.0, eta=1.0, adv_clip_max=5.0, clip_range=1e-4)
        assert abs(float(kl)) < 1e-8 and float(cf) == 0.0
        np.testing.assert_allclose(float(loss), 0.0, atol=1e-5)
    # guidance_scale <= 1: no guidance, negative embeds ignored
    s1 = make_sample_fn(_toy_unet, (4, 4, 1), guidance_scale=1.0, eta=1.0)
    a = s1(params, schedule, emb, neg, jax.random.PRNGKey(0))
    b = s1(params, schedule, emb, neg * 0 + 7.0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(a.latents), np.asarray(b.latents))
    assert math.isfinite(float(out.log_probs.sum()))
