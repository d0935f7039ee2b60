"""TRL 0.7.11's tests/test_ddpo_trainer.py, ported to rljax on the embedded tiny pipeline
(TRL builds hf-internal-testing/tiny-stable-diffusion-torch; here TinyDDPOPipeline, 16x16x1
pixel space, so the latent shapes differ). The LoRA variant has no counterpart: the tiny
pipeline trains its whole U-Net (use_lora=True is refused; see test_tiny_pipeline_refuses_lora)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.diffusion.pipeline import TinyDDPOPipeline
from rljax.trainers.ddpo import DDPOConfig, DDPOTrainer


def scorer_function(images, prompts, metadata):
    return np.random.randn(1) * 3.0, {}


def prompt_function():
    return ("cabbages", {})


@pytest.fixture(scope="module")
def trainer():
    config = DDPOConfig(
        num_epochs=2,
        train_gradient_accumulation_steps=1,
        per_prompt_stat_tracking_buffer_size=32,
        sample_num_batches_per_epoch=2,
        sample_batch_size=2,
        mixed_precision=None,
        save_freq=1000000,
    )
    pipeline = TinyDDPOPipeline(seed=0)
    with pytest.warns(UserWarning, match="image_samples_hook"):
        return DDPOTrainer(config, scorer_function, prompt_function, pipeline)


def test_loss(trainer):
    advantage = jnp.array([-1.0])
    clip_range = 0.0001
    ratio = jnp.array([1.0])
    loss = trainer.loss(advantage, clip_range, ratio)
    assert loss.item() == 1.0


def test_generate_samples(trainer):
    samples, output_pairs = trainer._generate_samples(1, 2)
    assert len(samples) == 1
    assert len(output_pairs) == 1
    assert len(output_pairs[0][0]) == 2


def test_calculate_loss(trainer):
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]

    latents = sample["latents"][0, 0][None]
    next_latents = sample["next_latents"][0, 0][None]
    log_probs = sample["log_probs"][0, 0][None]
    timesteps = sample["timesteps"][0, 0][None]
    prompt_embeds = sample["prompt_embeds"]
    advantage = jnp.array([1.0])

    assert latents.shape == (1, 16, 16, 1)
    assert next_latents.shape == (1, 16, 16, 1)
    assert log_probs.shape == (1,)
    assert timesteps.shape == (1,)
    assert prompt_embeds.shape == (2, 4, 32)
    loss, approx_kl, clipfrac = trainer.calculate_loss(
        latents, timesteps, next_latents, log_probs, advantage, prompt_embeds
    )

    assert jnp.isfinite(loss)


def test_tiny_pipeline_refuses_lora():
    with pytest.raises(ValueError, match="use_lora=False"):
        TinyDDPOPipeline(use_lora=True)


# -- beyond TRL's tests: the training loop, logged keys, per-prompt tracking, resume ------------
def _digit_prompt():
    return (["a one", "a seven"][np.random.randint(2)], {"k": 1})


def _brightness(images, prompts, metadata):
    return np.asarray(images).mean(axis=(1, 2, 3)), {"n": len(prompts)}


def _small_config(**kw):
    base = dict(num_epochs=2, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=2,
                train_batch_size=1, train_gradient_accumulation_steps=2, train_timestep_fraction=0.5,
                mixed_precision=None, save_freq=1, train_learning_rate=1e-3, per_prompt_stat_tracking=True,
                per_prompt_stat_tracking_buffer_size=4, per_prompt_stat_tracking_min_count=2)
    base.update(kw)
    return DDPOConfig(**base)


def test_train_logs_trl_keys_checkpoints_and_resumes(tmp_path):
    np.random.seed(0)
    hooked = []
    config = _small_config(project_kwargs={"project_dir": str(tmp_path)}, async_reward_computation=True)
    pipe = TinyDDPOPipeline(seed=0)
    before = jax.tree_util.tree_map(np.asarray, pipe.params)
    trainer = DDPOTrainer(config, _brightness, _digit_prompt, pipe,
                          image_samples_hook=lambda data, step, logger: hooked.append((len(data), step)))
    trainer.train(3)
    trainer.close()
    sample_logs = [h for h in trainer.log_history if "reward_mean" in h]
    train_logs = [h for h in trainer.log_history if "loss" in h]
    assert len(sample_logs) == 3 and sample_logs[0]["reward"].shape == (4,)
    assert set(train_logs[0]) >= {"approx_kl", "clipfrac", "loss", "epoch", "inner_epoch"}
    # 4 samples / (train_batch_size 1 * GA 2) = 2 optimizer updates per epoch
    assert len(train_logs) == 6 and [h["step"] for h in train_logs] == [0, 1, 2, 3, 4, 5]
    assert hooked == [(2, 0), (2, 2), (2, 4)]
    assert all(np.isfinite(h["loss"]) for h in train_logs)
    changed = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), pipe.params, before)
    assert max(jax.tree_util.tree_leaves(changed)) > 0  # the pipeline carries the trained params
    assert set(trainer.prompt_ids) == {"a one", "a seven"}
    # checkpoints at epochs 1 and 2 (TRL: epoch != 0 and epoch % save_freq == 0); resume continues at 3
    ckdir = trainer.checkpoint_dir()
    resumed = DDPOTrainer(_small_config(resume_from=ckdir, project_kwargs={"project_dir": str(tmp_path / "b")}),
                          _brightness, _digit_prompt, TinyDDPOPipeline(seed=1), image_samples_hook=lambda *a: None)
    assert resumed.first_epoch == 3 and resumed.global_step == 6
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state.params), jax.tree_util.tree_leaves(trainer.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(resumed.stat_tracker.buffer), np.asarray(trainer.stat_tracker.buffer))
    assert resumed.prompt_ids == trainer.prompt_ids


def test_config_errors_name_the_fix():
    pipe = TinyDDPOPipeline(seed=0)
    with pytest.raises(ValueError, match="must be greater than or equal to the train batch size"):
        DDPOTrainer(_small_config(train_batch_size=4), _brightness, _digit_prompt, pipe, lambda *a: None)
    with pytest.raises(ValueError, match="must be divisible by the total train batch size"):
        DDPOTrainer(_small_config(train_gradient_accumulation_steps=3), _brightness, _digit_prompt, pipe,
                    lambda *a: None)
    with pytest.raises(ValueError, match="sample_eta"):
        _small_config(sample_eta=0.0)
    with pytest.raises(ValueError, match="sd_pipeline lacks"):
        DDPOTrainer(_small_config(), _brightness, _digit_prompt, object(), lambda *a: None)


# -- rljax addition: frozen weights are arguments of the compiled programs (DESIGN.md) --------------
def _constant_bytes(hlo_text):
    """Bytes of the non-splat constants in a lowered StableHLO module (4 bytes per element)."""
    import re

    total = 0
    for line in hlo_text.splitlines():
        m = re.search(r"stablehlo\.constant dense<\"0x[0-9A-Fa-f]*\"> : tensor<([0-9x]+)x[a-z0-9]+>", line)
        if m:
            total += 4 * int(np.prod([int(d) for d in m.group(1).split("x")]))
    return total


class _HeavyFrozenPipeline(TinyDDPOPipeline):
    """The tiny pipeline plus 1 MiB of frozen weights that the denoiser and the decoder read
    (a stand-in for a LoRA base U-Net and a VAE); the outputs are unchanged (gain 1)."""

    def __init__(self):
        super().__init__(seed=0)
        w = np.random.default_rng(0).uniform(0.5, 1.5, (512, 512)).astype(np.float32)
        self._frozen = {"gain": jnp.asarray(w / w.mean())}

    @property
    def frozen_params(self):
        return self._frozen

    def unet_apply(self, params, latents, timesteps, embeds, frozen_params=None):
        frozen = self._frozen if frozen_params is None else frozen_params
        return super().unet_apply(params, latents, timesteps, embeds) * frozen["gain"].mean()

    def decode_latents(self, latents, frozen_params=None):
        frozen = self._frozen if frozen_params is None else frozen_params
        return super().decode_latents(latents) * frozen["gain"].mean()


def test_frozen_params_are_arguments_not_constants_of_the_compiled_programs():
    pipe = _HeavyFrozenPipeline()
    config = DDPOConfig(sample_num_steps=2, sample_batch_size=2, train_batch_size=2, mixed_precision=None,
                        save_freq=10**9)
    trainer = DDPOTrainer(config, scorer_function, prompt_function, pipe, image_samples_hook=lambda *a: None)
    frozen = pipe.frozen_params
    embeds = pipe.encode_prompts(["a one", "a two"])
    neg = jnp.repeat(trainer.neg_prompt_embed, 2, axis=0)
    key = jax.random.PRNGKey(0)
    args = (trainer.state.params, trainer.schedule, embeds, neg, key)
    # control: with frozen_params=None the pipeline closes over its weights -> >= 1 MiB of constants
    assert _constant_bytes(trainer._sample.lower(*args, None).as_text()) >= 2**20
    # the trainer's sampler, decoder and training step take them as arguments
    assert _constant_bytes(trainer._sample.lower(*args, frozen).as_text()) < 2**14
    out = trainer.sample(*args[:1], embeds, neg, key)
    assert _constant_bytes(trainer._decode.lower(out.latents[:, -1], frozen).as_text()) < 2**14
    samples, _ = trainer._generate_samples(1, 2)
    batch = {k: v for k, v in samples[0].items() if k != "prompt_ids"}
    batch["advantages"] = jnp.array([1.0, -1.0])
    lowered = trainer._train_inner_epoch.lower(trainer.state, trainer.schedule, batch, key, frozen)
    assert _constant_bytes(lowered.as_text()) < 2**14
    # and the numbers are those of the plain tiny pipeline (gain 1)
    ref = TinyDDPOPipeline(seed=0)
    ref_out = trainer._sample(ref.params, trainer.schedule, embeds, neg, key)
    np.testing.assert_allclose(np.asarray(out.latents), np.asarray(ref_out.latents), atol=1e-5)
