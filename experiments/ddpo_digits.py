"""DDPO on procedurally rendered digits, offline on CPU (TRL's examples/scripts/ddpo.py, tiny).

1. Render 16x16 seven-segment digits with jitter (numpy, no data download).
2. Pre-train the tiny text-conditioned denoiser (``TinyDDPOPipeline``) briefly on them (DDPM loss).
3. Train a small digit classifier; reward = its probability of the prompted digit.
4. DDPO (``DDPOTrainer``) raises that reward. Writes ``summary.json`` (``ddpo/reward_before``,
   ``ddpo/reward_after``: mean reward of the same prompts and PRNG keys), ``reward_curve.png``
   and ``samples_before_after.png`` in ``--output_dir``.

    python experiments/ddpo_digits.py --output_dir out/ddpo --fast
"""
from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rljax.diffusion.pipeline import DIGIT_WORDS, TinyDDPOPipeline, TinyPipelineConfig
from rljax.diffusion.schedulers import add_noise, make_ddim_schedule
from rljax.ddpo import make_sample_fn
from rljax.trainers.ddpo import DDPOConfig, DDPOTrainer

# segments: a (top), b (top right), c (bottom right), d (bottom), e (bottom left), f (top left), g (middle)
SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def render_digits(labels: np.ndarray, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """``[N] -> [N, size, size, 1]`` in [-1, 1]: seven-segment digits, random shift/thickness/noise."""
    out = np.zeros((len(labels), size, size), np.float32)
    for i, d in enumerate(labels):
        img = np.zeros((size, size), np.float32)
        x0, y0 = 4 + rng.integers(-1, 2), 2 + rng.integers(-1, 2)
        w, h, t = 7, 5, int(rng.integers(1, 3))
        seg = {"a": (y0, x0, 1, w), "g": (y0 + h, x0, 1, w), "d": (y0 + 2 * h, x0, 1, w),
               "f": (y0, x0, h + 1, 1), "b": (y0, x0 + w - 1, h + 1, 1),
               "e": (y0 + h, x0, h + 1, 1), "c": (y0 + h, x0 + w - 1, h + 1, 1)}
        for s in SEGMENTS[d]:
            y, x, hh, ww = seg[s]
            img[y:y + max(hh, t), x:x + max(ww, t)] = 1.0
        out[i] = img
    out = out + 0.05 * rng.standard_normal(out.shape).astype(np.float32)
    return (np.clip(out, 0, 1) * 2 - 1)[..., None]


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def train_classifier(rng, steps):
    clf = Classifier()
    params = clf.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 1)))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            clf.apply({"params": p}, x), y).mean())(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt, loss

    for _ in range(steps):
        y = rng.integers(0, 10, 128)
        params, opt, loss = step(params, opt, jnp.asarray(render_digits(y, rng)), jnp.asarray(y))
    return clf, params, float(loss)


def pretrain_denoiser(pipe, rng, steps, batch=64):
    schedule = make_ddim_schedule(pipe.scheduler_config, 10)
    tx = optax.adam(2e-3)
    params, opt = pipe.params, tx.init(pipe.params)
    all_embeds = pipe.encode_prompts([f"a {w}" for w in DIGIT_WORDS] + [""])

    @jax.jit
    def step(params, opt, x0, y, key):
        k1, k2, k3 = jax.random.split(key, 3)
        t = jax.random.randint(k1, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(k2, x0.shape)
        drop = jax.random.uniform(k3, (x0.shape[0],)) < 0.2  # condition dropout: learns the unconditional too
        emb = all_embeds[jnp.where(drop, 10, y)]

        def loss_fn(p):
            return jnp.mean((pipe.unet_apply(p, add_noise(schedule, x0, noise, t), t, emb) - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    key = jax.random.PRNGKey(2)
    for _ in range(steps):
        key, k = jax.random.split(key)
        y = rng.integers(0, 10, batch)
        params, opt, loss = step(params, opt, jnp.asarray(render_digits(y, rng)), jnp.asarray(y), k)
    pipe.set_params(params)
    return float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output_dir", default="out/ddpo_digits")
    ap.add_argument("--fast", action="store_true", help="tiny settings for CI (about a minute on 2 cores)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    rng = np.random.default_rng(0)
    pre_steps, clf_steps, epochs, steps = (150, 150, 8, 10) if args.fast else (1500, 600, 40, 20)
    epochs = args.epochs or epochs
    pipe = TinyDDPOPipeline(TinyPipelineConfig(), seed=0)
    den_loss = pretrain_denoiser(pipe, rng, pre_steps)
    clf, clf_params, clf_loss = train_classifier(rng, clf_steps)
    clf_apply = jax.jit(lambda p, x: jax.nn.softmax(clf.apply({"params": p}, x * 2 - 1)))

    def reward_fn(images, prompts, metadata):
        probs = np.asarray(clf_apply(clf_params, jnp.asarray(images)))
        return probs[np.arange(len(prompts)), [m["digit"] for m in metadata]], {}

    prompt_rng = np.random.default_rng(1)

    def prompt_fn():
        d = int(prompt_rng.integers(0, 10))
        return f"a {DIGIT_WORDS[d]}", {"digit": d}

    config = DDPOConfig(num_epochs=epochs, sample_num_steps=steps, sample_batch_size=16, sample_num_batches_per_epoch=2,
                        train_batch_size=8, train_gradient_accumulation_steps=1, train_learning_rate=3e-4,
                        sample_guidance_scale=2.0, train_timestep_fraction=0.5, train_clip_range=1e-4,
                        per_prompt_stat_tracking=False, mixed_precision=None, save_freq=10**9, seed=0)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipe, image_samples_hook=lambda *a: None)

    # fixed evaluation: the same prompts and PRNG keys before and after
    eval_digits = np.repeat(np.arange(10), 4)
    eval_embeds = pipe.encode_prompts([f"a {DIGIT_WORDS[d]}" for d in eval_digits])
    neg = jnp.repeat(trainer.neg_prompt_embed, len(eval_digits), axis=0)
    sample = make_sample_fn(pipe.unet_apply, pipe.latent_shape, guidance_scale=config.sample_guidance_scale,
                            eta=config.sample_eta)

    def evaluate(params):
        out = sample(params, trainer.schedule, eval_embeds, neg, jax.random.PRNGKey(123))
        images = np.asarray(pipe.decode_latents(out.latents[:, -1]))
        r, _ = reward_fn(images, eval_digits, [{"digit": int(d)} for d in eval_digits])
        return float(np.mean(r)), images

    before, img_before = evaluate(trainer.state.params)
    trainer.train()
    after, img_after = evaluate(trainer.state.params)
    curve = [h["reward_mean"] for h in trainer.log_history if "reward_mean" in h]
    summary = {"ddpo/reward_before": before, "ddpo/reward_after": after, "ddpo/reward_curve": curve,
               "denoiser_loss": den_loss, "classifier_loss": clf_loss, "epochs": epochs, "fast": bool(args.fast),
               "seconds": time.time() - t0}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(curve, marker="o")
        ax.set_xlabel("epoch"), ax.set_ylabel("reward_mean"), ax.set_title("DDPO on digits")
        fig.tight_layout(), fig.savefig(os.path.join(args.output_dir, "reward_curve.png")), plt.close(fig)
        fig, axes = plt.subplots(2, 1, figsize=(10, 2.6))
        for ax, imgs, name in ((axes[0], img_before, f"before ({before:.2f})"), (axes[1], img_after, f"after ({after:.2f})")):
            grid = np.concatenate([imgs[i * 4, ..., 0] for i in range(10)], axis=1)
            ax.imshow(grid, cmap="gray", vmin=0, vmax=1), ax.set_axis_off(), ax.set_title(name, fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(args.output_dir, "samples_before_after.png")), plt.close(fig)
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in summary.items() if k != "ddpo/reward_curve"}))
    return summary


if __name__ == "__main__":
    main()
