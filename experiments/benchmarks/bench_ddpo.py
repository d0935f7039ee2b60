"""One DDPO epoch (sampling + training), rljax vs TRL 0.7.11 on PyTorch, on CPU. Not a test.

Both sides load the SAME tiny random Stable Diffusion folder (diffusers' own SD test sizes, as
tests/test_sd_compat.py: U-Net (32, 64) channels with cross-attention 32, 8x8x4 latents; VAE
(32, 64) -> 16x16x3 images; 5-layer CLIP text encoder d=32; CLIP BPE tokenizer built offline,
model_max_length 8; DDIM scheduler with steps_offset=1), written by diffusers'
``StableDiffusionPipeline.save_pretrained(safe_serialization=True)`` in the TRL venv. TRL runs
``trl.DDPOTrainer`` on ``trl.DefaultDDPOStableDiffusionPipeline(folder, use_lora=...)``; rljax runs
``rljax.trainers.ddpo.DDPOTrainer`` on ``rljax.diffusion.sd_pipeline.DefaultDDPOStableDiffusionPipeline``
of the same folder, with the same ``DDPOConfig`` fields:

  sample   sample_num_batches_per_epoch x sample_batch_size images, sample_num_steps DDIM steps
           (eta 1, guidance 5, classifier-free guidance), per-step log-probs, VAE decode
  reward   mean brightness of the image (a Python function on each side)
  train    advantages, then train_num_inner_epochs=1 pass over every (sample, timestep) with
           TRL's clipped loss, Adam (lr 3e-4), gradient accumulation over the timesteps

An epoch is one ``trainer.step(epoch, global_step)`` call (what ``train()`` loops over);
mixed_precision="no" (fp32 on both), save_freq large (no checkpoints), log_with=None.
Rows: full U-Net training (use_lora=False) and LoRA r=4 on the attention projections
(use_lora=True). Reported: median seconds per epoch over the timed epochs (excluding the
first, warm-up epoch), TRL / rljax, the sampling part of it (``trainer._generate_samples``:
prompts, text encoder, the DDIM trajectory, VAE decode; the rest is rewards, advantages and
training), each side's first epoch, and rljax's compile cost (first epoch minus the steady
median: traces + XLA compiles of the sampler, decoder and train epoch).

Each side runs in its own process pinned to ``--threads`` CPUs (torch.set_num_threads on the TRL
side), TRL in its own venv (experiments/benchmarks/trl_env.sh, default .trl-venv in the
repository root, with diffusers/peft for DDPO).

--quick: 4 DDIM steps, 1 batch of 4 images, 1 timed epoch, the LoRA row only (about 4-5 minutes on a
busy 2-core machine, most of it rljax's compile and TRL's first epochs).

  python experiments/benchmarks/bench_ddpo.py [--quick] [--epochs 3] [--lora 0,1] [--threads 2]
      [--trl-python .trl-venv/bin/python] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _report import emit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRL_PYTHON = os.path.join(ROOT, ".trl-venv", "bin", "python")
PROMPTS = ["a cab", "ab ab", "a b c", "cab ab a"]

# The DDPOConfig fields both sides get (full run / --quick).
FULL = dict(sample_num_steps=10, sample_batch_size=8, sample_num_batches_per_epoch=2, train_batch_size=4,
            train_gradient_accumulation_steps=1)
QUICK = dict(sample_num_steps=4, sample_batch_size=4, sample_num_batches_per_epoch=1, train_batch_size=2,
             train_gradient_accumulation_steps=1)
COMMON = dict(sample_eta=1.0, sample_guidance_scale=5.0, train_num_inner_epochs=1, train_learning_rate=3e-4,
              train_cfg=True, train_timestep_fraction=1.0, mixed_precision="no", save_freq=10**9, log_with=None,
              seed=0, per_prompt_stat_tracking=False, async_reward_computation=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller epoch (4 steps, 4 images), 1 timed epoch")
    p.add_argument("--epochs", type=int, default=None,
                   help="timed epochs per side after 1 warm-up (default 3; --quick: 1)")
    p.add_argument("--lora", default=None,
                   help="comma-separated use_lora values to run: 0 (full U-Net), 1 (LoRA); default 0,1 (--quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    p.add_argument("--trl-python", default=TRL_PYTHON, help="python of the TRL 0.7.11 venv (with diffusers, peft)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    # internal: one side (or the folder build) in this process; prints a JSON line
    p.add_argument("--worker", choices=["build", "rljax", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--use-lora", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# The tiny folder (TRL venv: diffusers + transformers 4.38)
# ---------------------------------------------------------------------------


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_folder(folder: str) -> dict:
    """tests/test_sd_compat.py's tiny random StableDiffusionPipeline, saved to ``folder``."""
    import diffusers
    import torch
    import transformers

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("ab", "ab</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\na b\na b</w>\n")
        tokenizer = transformers.CLIPTokenizer(vocab_file, merges_file, model_max_length=8)

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=32)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, max_position_embeddings=16))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (unet, vae, text_encoder):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # zero-initialised layers get weights too
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return {"unet_params": sum(p.numel() for p in unet.parameters())}


# ---------------------------------------------------------------------------
# Shared workload
# ---------------------------------------------------------------------------


def make_prompt_fn():
    import random

    rs = random.Random(0)
    return lambda: (rs.choice(PROMPTS), {})


def brightness(images) -> list:
    """Mean pixel value per image (layout-free: works on TRL's [B, C, H, W] and rljax's [B, H, W, C])."""
    import numpy as np

    x = np.asarray(images, np.float32)
    return x.reshape(x.shape[0], -1).mean(axis=1).tolist()


def time_sampling(trainer, sync=lambda out: out) -> list:
    """Wrap ``trainer._generate_samples`` (both trainers call it from ``step``) to record its
    seconds per call; ``sync`` waits for the result (JAX dispatches asynchronously)."""
    record, inner = [], trainer._generate_samples

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = sync(inner(*args, **kwargs))
        record.append(time.perf_counter() - t0)
        return out

    trainer._generate_samples = timed
    return record


def run_epochs(trainer, n: int, sampling: list) -> dict:
    """1 warm-up + n timed ``trainer.step`` calls -> per-epoch seconds (and the sampling part)."""
    times, first, global_step = [], None, 0
    for epoch in range(n + 1):
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        dt = time.perf_counter() - t0
        if epoch == 0:
            first = dt
        else:
            times.append(dt)
        print(f"  epoch {epoch}: {dt:.2f}s (sampling {sampling[-1]:.2f}s, global_step {global_step})",
              file=sys.stderr, flush=True)
    return dict(first=first, median=statistics.median(times), min=min(times), times=times, updates=global_step,
                sampling=statistics.median(sampling[1:]))


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def rljax_worker(folder: str, use_lora: bool, fields: dict, n: int) -> dict:
    import warnings

    import jax

    from rljax.diffusion.sd_pipeline import DefaultDDPOStableDiffusionPipeline
    from rljax.trainers.ddpo import DDPOConfig, DDPOTrainer

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    pipe = DefaultDDPOStableDiffusionPipeline(folder, use_lora=use_lora)
    load = time.perf_counter() - t0

    def reward_fn(images, prompts, metadata):
        return brightness(jax.device_get(images)), {}

    trainer = DDPOTrainer(DDPOConfig(**fields, **COMMON), reward_fn, make_prompt_fn(), pipe)
    out = run_epochs(trainer, n, time_sampling(trainer, sync=jax.block_until_ready))
    out["load"] = load
    out["trainable"] = int(sum(x.size for x in jax.tree_util.tree_leaves(pipe.params)))
    out["versions"] = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    return out


def trl_worker(folder: str, use_lora: bool, fields: dict, n: int, threads: int) -> dict:
    import warnings

    import torch

    torch.set_num_threads(threads)
    import accelerate
    import diffusers
    import peft
    import transformers
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    pipe = DefaultDDPOStableDiffusionPipeline(folder, use_lora=use_lora)
    load = time.perf_counter() - t0

    def reward_fn(images, prompts, metadata):
        return torch.tensor(brightness(images.float().cpu().numpy())), {}

    with tempfile.TemporaryDirectory() as logdir:
        trainer = DDPOTrainer(DDPOConfig(**fields, **COMMON, logdir=logdir), reward_fn, make_prompt_fn(), pipe)
        out = run_epochs(trainer, n, time_sampling(trainer))
    out["load"] = load
    out["trainable"] = int(sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad))
    out["versions"] = {"trl": trl.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                       "transformers": transformers.__version__, "torch": torch.__version__,
                       "accelerate": accelerate.__version__, "torch_threads": torch.get_num_threads()}
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_side(python: str, side: str, folder: str, threads: int, extra=()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--folder", folder, "--threads", str(threads), *extra]
    print(f"[{side}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{side} worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    fields = QUICK if args.quick else FULL
    n = args.epochs if args.epochs is not None else (1 if args.quick else 3)
    if args.worker:  # pin before jax / torch start their thread pools (XLA sizes its pool from the usable CPUs)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.worker == "build":
        print(json.dumps(build_folder(args.folder)))
        return
    if args.worker == "rljax":
        print(json.dumps(rljax_worker(args.folder, bool(args.use_lora), fields, n)))
        return
    if args.worker == "trl":
        print(json.dumps(trl_worker(args.folder, bool(args.use_lora), fields, n, args.threads)))
        return
    if not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} not found: create the TRL venv with experiments/benchmarks/trl_env.sh")
    lora_arg = args.lora if args.lora is not None else ("1" if args.quick else "0,1")
    loras = [int(x) for x in lora_arg.split(",") if x.strip()]
    if not loras or any(x not in (0, 1) for x in loras):
        raise SystemExit(f"--lora takes 0 and/or 1 (comma-separated), got {lora_arg!r}.")

    rows, versions = [], {}
    load_before = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "tiny_sd")
        built = run_side(args.trl_python, "build", folder, args.threads)
        for lora in loras:
            extra = ["--use-lora", str(lora), "--epochs", str(n)] + (["--quick"] if args.quick else [])
            theirs = run_side(args.trl_python, "trl", folder, args.threads, extra)
            ours = run_side(sys.executable, "rljax", folder, args.threads, extra)
            versions.update(ours["versions"])
            versions.update(theirs["versions"])
            rows.append((lora, ours, theirs))
    load_after = os.getloadavg()

    images = fields["sample_batch_size"] * fields["sample_num_batches_per_epoch"]
    lines = [
        f"DDPO epoch{' (--quick)' if args.quick else ''}: sample {fields['sample_num_batches_per_epoch']} x "
        f"{fields['sample_batch_size']} images ({fields['sample_num_steps']} DDIM steps, guidance 5, 16x16 px from "
        f"8x8x4 latents), brightness reward, train 1 inner epoch (train_batch_size {fields['train_batch_size']}, "
        f"{images // fields['train_batch_size']} updates x {fields['sample_num_steps']} timesteps); tiny random SD "
        f"(U-Net {built['unet_params']:,} params); CPU, {args.threads} threads, fp32",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}); load average (1 min) at start/end: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} (shared machine: noisy); wall {time.time() - t_start:.0f} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; python {platform.python_version()}",
        f"- timed epochs per side: {n} after 1 warm-up epoch; medians exclude the warm-up",
        "",
        "| use_lora | trainable params (TRL / rljax) | TRL s/epoch median (min) | rljax s/epoch median (min) "
        "| TRL / rljax (medians) | of which sampling s (TRL / rljax) | TRL first epoch s | rljax first epoch s "
        "| rljax compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lora, ours, theirs in rows:
        lines.append(
            f"| {bool(lora)} | {theirs['trainable']:,} / {ours['trainable']:,} | "
            f"{theirs['median']:.2f} ({theirs['min']:.2f}) | {ours['median']:.2f} ({ours['min']:.2f}) | "
            f"{theirs['median'] / ours['median']:.2f}x | {theirs['sampling']:.2f} / {ours['sampling']:.2f} | "
            f"{theirs['first']:.2f} | {ours['first']:.2f} | "
            f"{max(ours['first'] - ours['median'], 0.0):.1f} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
