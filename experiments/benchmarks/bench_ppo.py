"""One PPO iteration, rljax vs TRL 0.7.11 on PyTorch, on CPU. Not a test.

An iteration is what a TRL script's training loop does per batch, with the same
settings on both sides:

  generate  64 new tokens (sampling, top_k=0, top_p=1, min_new_tokens=64 so every
            response has exactly 64) for 16 prompts of 4-15 tokens, in one batch
  score     a simple host-side reward (share of even token ids in the response)
  step      PPOTrainer.step: forward pass of policy and reference, rewards,
            advantages, then ppo_epochs=4 x 4 shuffled minibatches of 4 (Adam,
            lr 1.41e-5, TRL's other defaults: init_kl_coef 0.2, adaptive KL, ...)

Models (random weights, written once by the rljax side as an HF checkpoint that
TRL's ``AutoModelForCausalLMWithValueHead.from_pretrained`` loads):

  tiny   GPT-2, 4 layers, d=256, 4 heads, vocab 50257
  small  the GPT-2-small shape: 12 layers, d=768, 12 heads, vocab 50257 (124M)

The rljax side uses the TRL-compatible shell (``rljax.PPOTrainer``), so both run the
same user-level code. TRL runs in its own venv (``experiments/benchmarks/trl_env.sh``,
default: .trl-venv in the repository root) as a subprocess of this script, with ``torch.set_num_threads``
= ``--threads``; each side's process is pinned to ``--threads`` CPUs. On a shared,
busy machine PyTorch's thread pool suffers most from oversubscription (see
bench_models.py), so also run ``--threads 1`` there. Reported: seconds per iteration after warm-up (median), the ratio
TRL / rljax (> 1: rljax is faster) and rljax's one-off compile cost, measured as its
first iteration minus the steady median (traces + XLA compiles of generation, the
forward pass and the PPO step).

  python experiments/benchmarks/bench_ppo.py [--models tiny,small] [--iters 3]
      [--small-iters 1] [--threads 2] [--trl-python .trl-venv/bin/python] [--out FILE]
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

# The TRL 0.7.11 venv that trl_env.sh creates by default, in the repository root.
TRL_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          ".trl-venv", "bin", "python")

BATCH, MINI_BATCH, EPOCHS, NEW_TOKENS = 16, 4, 4, 64
MODELS = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
}
VOCAB, EOS = 50257, 50256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small", help="comma-separated subset of: tiny, small")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per side for the tiny model (after 1 warm-up)")
    p.add_argument("--small-iters", type=int, default=1, help="timed iterations per side for the GPT-2-small shape")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    p.add_argument("--trl-python", default=TRL_PYTHON, help="python of the TRL 0.7.11 venv")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    # internal: run one side in this process and print a JSON line
    p.add_argument("--worker", choices=["rljax", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Shared workload (plain Python + numpy: runs in both venvs)
# ---------------------------------------------------------------------------


def prompts(iteration: int):
    """The BATCH prompts of an iteration (4-15 random tokens), identical on both sides."""
    import numpy as np

    rs = np.random.RandomState(1000 + iteration)
    return [rs.randint(0, EOS, n).astype(np.int64) for n in rs.randint(4, 16, BATCH)]


def reward(response) -> float:
    import numpy as np

    r = np.asarray(response)
    return float((r % 2 == 0).mean())


GEN_KWARGS = dict(min_length=-1, top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=EOS,
                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def make_tokenizer():
    """A stand-in tokenizer (no hub access): only its pad/eos ids are used, GPT-2's 50256."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<|endoftext|>": EOS}, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def run_loop(generate, step, n: int):
    """1 warm-up + n timed iterations -> dict of per-iteration seconds."""
    times, gen_times, first = [], [], None
    for it in range(n + 1):
        queries = prompts(it)
        t0 = time.perf_counter()
        responses = generate(queries)
        t_gen = time.perf_counter() - t0
        assert all(len(r) == NEW_TOKENS for r in responses), [len(r) for r in responses]
        stats = step(queries, responses, [reward(r) for r in responses])
        dt = time.perf_counter() - t0
        if it == 0:
            first = dt
        else:
            times.append(dt)
            gen_times.append(t_gen)
        print(f"  iter {it}: {dt:.2f}s (generate {t_gen:.2f}s) loss/total={stats['ppo/loss/total']:.4f}",
              file=sys.stderr, flush=True)
    return dict(first=first, median=statistics.median(times), min=min(times), generate=statistics.median(gen_times),
                times=times)


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def rljax_worker(model_dir: str, n: int):
    import jax

    from rljax import PPOConfig, PPOTrainer
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS, seed=0)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=make_tokenizer())
    gen = lambda qs: trainer.generate(qs, return_prompt=False, batch_size=BATCH, **GEN_KWARGS)  # noqa: E731
    out = run_loop(gen, trainer.step, n)
    out["versions"] = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    return out


def trl_worker(model_dir: str, n: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    import transformers
    import trl
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS, seed=0)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=make_tokenizer())

    def gen(qs):
        out = trainer.generate([torch.tensor(q) for q in qs], return_prompt=False, batch_size=BATCH, **GEN_KWARGS)
        return [o.numpy() for o in out]

    def step(qs, rs, scores):
        return trainer.step([torch.tensor(q) for q in qs], [torch.tensor(r) for r in rs],
                            [torch.tensor(s) for s in scores])

    out = run_loop(gen, step, n)
    out["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def write_checkpoint(name: str, directory: str) -> None:
    """Random GPT-2 weights (HF's N(0, 0.02) init) with a value head, saved by rljax."""
    import jax
    import jax.numpy as jnp

    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import AutoModelForCausalLMWithValueHead

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, bos_token_id=EOS, eos_token_id=EOS, **MODELS[name])
    lm = model_from_config(cfg)
    params = init_params(lm, jax.random.PRNGKey(0))
    # flax's default init is not GPT-2's; use N(0, 0.02) weights and the usual ones/zeros for norms and biases
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))

    def hf_like(path, x):
        leaf = path[-1].key
        if leaf == "scale":
            return jnp.ones_like(x)
        if leaf == "bias":
            return jnp.zeros_like(x)
        return 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)

    params = jax.tree_util.tree_map_with_path(hf_like, params)
    AutoModelForCausalLMWithValueHead.from_lm(lm, params, summary_dropout_prob=0.1).save_pretrained(directory)


def run_side(python: str, side: str, model_dir: str, n: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--model-dir", model_dir, "--n", str(n),
           "--threads", str(threads)]
    print(f"[{side}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if proc.returncode:
        raise SystemExit(f"{side} worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.worker:  # pin before jax / torch start their thread pools (XLA sizes its pool from the usable CPUs)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.worker == "rljax":
        print(json.dumps(rljax_worker(args.model_dir, args.n)))
        return
    if args.worker == "trl":
        print(json.dumps(trl_worker(args.model_dir, args.n, args.threads)))
        return
    if not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} not found: create the TRL venv with experiments/benchmarks/trl_env.sh")

    rows, versions = [], {}
    load_before = os.getloadavg()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        n = args.iters if name == "tiny" else args.small_iters
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(name, d)
            ours = run_side(sys.executable, "rljax", d, n, args.threads)
            theirs = run_side(args.trl_python, "trl", d, n, args.threads)
        versions.update(ours["versions"])
        versions.update(theirs["versions"])
        rows.append((name, n, ours, theirs))

    shape = {k: f"{v['n_layer']} layers, d={v['n_embd']}" for k, v in MODELS.items()}
    lines = [
        f"PPO iteration (generate {NEW_TOKENS} tokens x batch {BATCH}, reward, step: {EPOCHS} epochs x "
        f"{BATCH // MINI_BATCH} minibatches of {MINI_BATCH}), CPU, {args.threads} threads",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}); load average before/after: "
        f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f} (shared machine: noisy)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; python {platform.python_version()}",
        "",
        "| model | timed iters | TRL s/iter median (min) | rljax s/iter median (min) | TRL / rljax (medians) "
        "| TRL generate s | rljax generate s | rljax compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, n, ours, theirs in rows:
        lines.append(
            f"| {name} ({shape[name]}) | {n} | {theirs['median']:.2f} ({theirs['min']:.2f}) | "
            f"{ours['median']:.2f} ({ours['min']:.2f}) | "
            f"{theirs['median'] / ours['median']:.2f}x | {theirs['generate']:.2f} | {ours['generate']:.2f} | "
            f"{max(ours['first'] - ours['median'], 0.0):.1f} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
