"""DDPO on procedurally rendered digits, offline on CPU (TRL's examples/scripts/ddpo.py, tiny).

1. Render small seven-segment digits with jitter (numpy, no data download).
2. Pre-train the tiny text-conditioned denoiser (``TinyDDPOPipeline``) briefly on them (DDPM loss,
   10% prompt dropout so classifier-free guidance has an unconditional model).
3. Reward (``--reward``): ``jpeg`` (default) is the DDPO paper's compressibility, minus the JPEG
   size in kB of each image (PIL, quality 95), computed on the host by a Python function through
   the trainer's async reward path; ``digit`` trains a small classifier and rewards its probability
   of the prompted digit (does NOT rise at this size: the briefly pre-trained denoiser's conditioning
   is too weak for per-prompt advantages; see experiments/notes/ddpo.md).
4. DDPO (``DDPOTrainer``) raises the reward. Writes ``summary.json`` (``ddpo/reward_name``,
   ``ddpo/reward_before``, ``ddpo/reward_after``: mean reward of the same prompts and PRNG keys
   before and after training, averaged over the ``--eval_seeds`` sets, each set's mean also given;
   ``ddpo/reward_curve``: the mean reward of each epoch's samples),
   ``reward_curve.png`` and ``samples_before_after.png`` in ``--output_dir``.

The scheduler uses ``beta_start=0.005`` (diffusers' default 1e-4): the last DDIM step goes to
timestep 0, whose standard deviation is about ``sqrt(beta_start / 2)``; at 1e-4 (0.007) any parameter
change moves that step's log-ratio far outside the clip range, those terms dominate the clipped
gradient, and training drifts the same way whatever the reward's sign (notes/ddpo.md). The --fast
settings (20 epochs of 90 samples, 6 updates per epoch, all 8 timesteps trained, 200 pretraining
steps) raised JPEG compressibility by +0.041 to +0.051 kB on seeds 0-2 (notes/ddpo.md, seed table).

    python experiments/ddpo_digits.py --output_dir out/ddpo --fast   # CI
    python experiments/ddpo_digits.py --output_dir out/ddpo          # longer, higher reward
"""
from __future__ import annotations

import argparse
import io
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
from rljax.trainers.ddpo import DDPOConfig, DDPOTrainer

# segments: a (top), b (top right), c (bottom right), d (bottom), e (bottom left), f (top left), g (middle)
SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]

# (fast, full) settings. The fast ones fit CI's budget; see experiments/notes/ddpo.md for the tuning.
SETTINGS = {
    "fast": {"image_size": 12, "features": (8, 16), "time_dim": 32, "pretrain_steps": 200, "classifier_steps": 100,
             "epochs": 20, "sample_num_steps": 8, "sample_batch_size": 30, "sample_batches": 3, "train_batch_size": 15,
             "timestep_fraction": 1.0, "guidance": 2.0, "beta_start": 0.005, "inner_epochs": 1},
    "full": {"image_size": 12, "features": (8, 16), "time_dim": 32, "pretrain_steps": 2000, "classifier_steps": 300,
             "epochs": 40, "sample_num_steps": 8, "sample_batch_size": 30, "sample_batches": 3, "train_batch_size": 15,
             "timestep_fraction": 1.0, "guidance": 2.0, "beta_start": 0.005, "inner_epochs": 1},
}
# per reward: learning rate, clip range, per-prompt stat tracking (see notes/ddpo.md)
REWARD_SETTINGS = {"jpeg": {"lr": 3e-3, "clip": 0.1, "per_prompt": False},
                   "digit": {"lr": 1e-3, "clip": 1e-2, "per_prompt": True}}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.005, "clip_sample": True,
             "steps_offset": 1, "set_alpha_to_one": False}


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """``[S, S, 1]`` in [0, 1] -> size in kB of its 8-bit grayscale JPEG (PIL, ``quality``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image[..., 0], 0, 1) * 255).round().astype(np.uint8), "L").save(
        buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def jpeg_compressibility(images, prompts, metadata):
    """DDPO paper's compressibility reward: ``-jpeg_size_kb`` per image (``[B, S, S, 1]`` -> ``[B]``)."""
    return np.asarray([-jpeg_size_kb(im) for im in np.asarray(images)], np.float32), {}


def render_digits(labels: np.ndarray, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """``[N] -> [N, size, size, 1]`` in [-1, 1]: seven-segment digits, random shift/thickness/noise."""
    s = size / 16
    w, h = max(3, round(7 * s)), max(2, round(5 * s))
    out = np.zeros((len(labels), size, size), np.float32)
    for i, d in enumerate(labels):
        x0, y0 = round(4 * s) + rng.integers(-1, 2), round(2 * s) + rng.integers(-1, 2)
        t = int(rng.integers(1, 3))
        seg = {"a": (y0, x0, 1, w), "g": (y0 + h, x0, 1, w), "d": (y0 + 2 * h, x0, 1, w),
               "f": (y0, x0, h + 1, 1), "b": (y0, x0 + w - 1, h + 1, 1),
               "e": (y0 + h, x0, h + 1, 1), "c": (y0 + h, x0 + w - 1, h + 1, 1)}
        for name in SEGMENTS[d]:
            y, x, hh, ww = seg[name]
            out[i, max(y, 0):y + max(hh, t), max(x, 0):x + max(ww, t)] = 1.0
    out = out + 0.05 * rng.standard_normal(out.shape).astype(np.float32)
    return (np.clip(out, 0, 1) * 2 - 1)[..., None]


class Classifier(nn.Module):
    """Two strided convs and a linear layer: ``[B, S, S, 1]`` in [-1, 1] -> 10 logits."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def train_classifier(rng: np.random.Generator, steps: int, size: int):
    """Returns ``(module, params, last loss, held-out accuracy)``."""
    clf = Classifier()
    params = clf.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 1)))["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            clf.apply({"params": p}, x), y).mean())(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt, loss

    opt = tx.init(params)
    labels = rng.integers(0, 10, 4096)
    images = jnp.asarray(render_digits(labels, rng, size))  # one bank of jittered renders, drawn from per step
    for _ in range(steps):
        idx = rng.integers(0, len(labels), 128)
        params, opt, loss = step(params, opt, images[idx], jnp.asarray(labels[idx]))
    y = rng.integers(0, 10, 500)
    logits = np.asarray(clf.apply({"params": params}, jnp.asarray(render_digits(y, rng, size))))
    acc = float(np.mean(logits.argmax(-1) == y))
    return clf, params, float(loss), acc


def pretrain_denoiser(pipe: TinyDDPOPipeline, rng: np.random.Generator, steps: int, batch: int = 64,
                      seed: int = 0) -> float:
    """DDPM epsilon loss on rendered digits, prompt "a <digit>" (dropped to "" 10% of the time)."""
    schedule = make_ddim_schedule(pipe.scheduler_config, 10)
    tx = optax.adam(3e-3)
    params, opt = pipe.params, tx.init(pipe.params)
    all_embeds = pipe.encode_prompts([f"a {w}" for w in DIGIT_WORDS] + [""])
    size = pipe.latent_shape[0]

    @jax.jit
    def step(params, opt, x0, y, key):
        k1, k2, k3 = jax.random.split(key, 3)
        t = jax.random.randint(k1, (x0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k2, x0.shape)
        drop = jax.random.uniform(k3, (x0.shape[0],)) < 0.1
        emb = all_embeds[jnp.where(drop, 10, y)]

        def loss_fn(p):
            return jnp.mean((pipe.unet_apply(p, add_noise(schedule, x0, noise, t), t, emb) - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    labels = rng.integers(0, 10, 4096)
    images = jnp.asarray(render_digits(labels, rng, size))  # one bank of jittered renders, drawn from per step
    key = jax.random.PRNGKey(2 + seed)
    for _ in range(steps):
        key, k = jax.random.split(key)
        idx = rng.integers(0, len(labels), batch)
        params, opt, loss = step(params, opt, images[idx], jnp.asarray(labels[idx]), k)
    pipe.set_params(params)
    return float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="out/ddpo_digits")
    ap.add_argument("--fast", action="store_true", help="small settings for CI (see notes/ddpo.md for seconds)")
    ap.add_argument("--epochs", type=int, default=None, help="DDPO epochs (default: 20 with --fast, else 40)")
    ap.add_argument("--reward", choices=sorted(REWARD_SETTINGS), default="jpeg",
                    help="jpeg: minus JPEG size in kB (rises); digit: classifier p(prompted digit) (flat at this size)")
    ap.add_argument("--seed", type=int, default=0, help="seed of pretraining, prompts and DDPO sampling")
    ap.add_argument("--eval_seeds", type=int, nargs="+", default=[1000, 2000],
                    help="PRNG seeds of the fixed evaluation sets (60 images each, same before and after)")
    ap.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)
    s = dict(SETTINGS["fast" if args.fast else "full"], **REWARD_SETTINGS[args.reward])
    epochs = args.epochs or s["epochs"]
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    times = {}
    rng = np.random.default_rng(args.seed)
    size = s["image_size"]
    pipe = TinyDDPOPipeline(TinyPipelineConfig(image_size=size, features=s["features"], time_dim=s["time_dim"],
                                               scheduler=dict(SCHEDULER, beta_start=s["beta_start"])), seed=args.seed)
    den_loss = pretrain_denoiser(pipe, rng, s["pretrain_steps"], seed=args.seed)
    times["pretrain_s"] = time.time() - t0
    clf_loss = clf_acc = None
    if args.reward == "digit":
        clf, clf_params, clf_loss, clf_acc = train_classifier(rng, s["classifier_steps"], size)
        times["classifier_s"] = time.time() - t0 - times["pretrain_s"]
        clf_apply = jax.jit(lambda p, x: jax.nn.softmax(clf.apply({"params": p}, x * 2 - 1)))

        def reward_fn(images, prompts, metadata):
            probs = np.asarray(clf_apply(clf_params, jnp.asarray(images)))
            return probs[np.arange(len(prompts)), [m["digit"] for m in metadata]], {}
    else:
        reward_fn = jpeg_compressibility

    prompt_rng = np.random.default_rng(1 + args.seed)

    def prompt_fn():
        d = int(prompt_rng.integers(0, 10))
        return f"a {DIGIT_WORDS[d]}", {"digit": d}

    config = DDPOConfig(
        num_epochs=epochs, sample_num_steps=s["sample_num_steps"], sample_batch_size=s["sample_batch_size"],
        sample_num_batches_per_epoch=s["sample_batches"], train_batch_size=s["train_batch_size"],
        train_gradient_accumulation_steps=1, train_learning_rate=s["lr"], train_num_inner_epochs=s["inner_epochs"],
        sample_guidance_scale=s["guidance"], train_timestep_fraction=s["timestep_fraction"],
        train_clip_range=s["clip"], train_adv_clip_max=5.0, per_prompt_stat_tracking=s["per_prompt"],
        async_reward_computation=args.reward == "jpeg", per_prompt_stat_tracking_buffer_size=16,
        per_prompt_stat_tracking_min_count=4, mixed_precision=None, save_freq=10**9, seed=args.seed)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipe, image_samples_hook=lambda *a: None)

    # fixed evaluation: the same prompts and PRNG keys before and after, through the trainer's
    # (already compiled) sampler in batches of sample_batch_size
    bs = config.sample_batch_size
    eval_digits = np.arange(-(-60 // bs) * bs) % 10  # >= 60 prompts, a whole number of sampler batches
    eval_embeds = pipe.encode_prompts([f"a {DIGIT_WORDS[d]}" for d in eval_digits])
    neg = jnp.repeat(trainer.neg_prompt_embed, bs, axis=0)

    def evaluate(params):
        """Mean reward of each evaluation set (its seed's PRNG keys), and the first set's images."""
        means, first = [], None
        for seed in args.eval_seeds:
            images = []
            for i in range(0, len(eval_digits), bs):
                out = trainer.sample(params, eval_embeds[i:i + bs], neg, jax.random.PRNGKey(seed + i))
                images.append(np.asarray(trainer.decode(out.latents[:, -1])))
            images = np.concatenate(images)
            r, _ = reward_fn(images, eval_digits, [{"digit": int(d)} for d in eval_digits])
            means.append(float(np.mean(r)))
            first = images if first is None else first
        return means, first

    t1 = time.time()
    before_sets, img_before = evaluate(trainer.state.params)
    trainer.train(progress_bar=not args.no_progress)
    after_sets, img_after = evaluate(trainer.state.params)
    before, after = float(np.mean(before_sets)), float(np.mean(after_sets))
    trainer.close()
    times["ddpo_s"] = time.time() - t1
    curve = [h["reward_mean"] for h in trainer.log_history if "reward_mean" in h]
    kl = [h["approx_kl"] for h in trainer.log_history if "approx_kl" in h]
    summary = {"ddpo/reward_name": args.reward, "ddpo/reward_before": before, "ddpo/reward_after": after,
               "ddpo/reward_before_per_eval_seed": before_sets, "ddpo/reward_after_per_eval_seed": after_sets,
               "eval_seeds": list(args.eval_seeds), "seed": args.seed, "ddpo/reward_curve": curve,
               "ddpo/approx_kl_last": kl[-1] if kl else None, "denoiser_loss": den_loss, "classifier_loss": clf_loss,
               "classifier_accuracy": clf_acc, "epochs": epochs, "fast": bool(args.fast), **times,
               "seconds": time.time() - t0, "cpu_seconds": time.process_time()}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(curve, marker="o", label="training samples")
        ax.axhline(before, color="gray", ls="--", label="eval before")
        ax.axhline(after, color="k", ls="-", label="eval after")
        ax.set_xlabel("epoch"), ax.set_title("DDPO on digits")
        ax.set_ylabel({"jpeg": "reward (-JPEG kB)", "digit": "reward (p(prompted digit))"}[args.reward])
        ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(os.path.join(args.output_dir, "reward_curve.png")), plt.close(fig)
        fig, axes = plt.subplots(2, 1, figsize=(10, 6))
        for ax, imgs, name in ((axes[0], img_before, f"before ({before:.3f})"),
                               (axes[1], img_after, f"after ({after:.3f})")):
            rows = [np.concatenate(list(imgs[r * 10:(r + 1) * 10, ..., 0]), axis=1) for r in range(len(imgs) // 10)]
            ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=1), ax.set_axis_off()
            ax.set_title(f"{name}; columns: prompts 'a zero' .. 'a nine'", fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(args.output_dir, "samples_before_after.png")), plt.close(fig)
    except ImportError:
        pass
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()
                      if k != "ddpo/reward_curve"}))
    return summary


if __name__ == "__main__":
    main()
