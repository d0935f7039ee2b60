"""SFT and DPO train steps, rljax vs TRL 0.7.11 on PyTorch, on CPU. Not a test.

One command runs both sides on the same checkpoint and the same batch: rljax in
this process, TRL in its own venv (``experiments/benchmarks/trl_env.sh``, default
.trl-venv in the repository root) as a subprocess, one after the other, with the same number of
CPU threads (process CPU affinity for both; ``torch.set_num_threads`` for TRL).

Cases (float32, batch 8, every row 128 real tokens, so both sides see the same
token count and there is no padding):

  sft  one optimizer update: forward + backward + global-norm clipping at 1.0 + AdamW
       (HF TrainingArguments defaults: lr 5e-5 with linear decay, betas 0.9/0.999,
       eps 1e-8, weight decay 0), dropout 0.1 on (training mode); labels = input ids.
       rljax: ``rljax.sft.make_sft_loss`` + ``rljax.trainers.base.make_train_step`` with
       ``make_optimizer`` (the step ``rljax.SFTTrainer.train`` runs).
       TRL: ``trl.SFTTrainer(..., packing=True).train()`` with ``max_steps`` on a
       pre-tokenized torch dataset of 8 packed 128-token rows.
  dpo  one DPO update on 8 pairs: reference forward (chosen + rejected, no grad), policy
       forward on the 16 concatenated rows, sigmoid DPO loss (beta 0.1) and TRL's
       metrics, backward, clipping, AdamW (same settings); dropout off (TRL's
       ``disable_dropout=True``). Rows are BOS + 63 prompt tokens + 63 answer tokens + EOS.
       rljax: ``rljax.dpo.make_reference_logps_fn`` then ``make_dpo_loss`` +
       ``make_train_step``. TRL: ``trl.DPOTrainer(model, ref_model=None, ...).train()``
       with ``max_steps`` (reference = TRL's frozen copy of the policy); its dataset is
       text (``t<id>`` words through a word-level tokenizer) that tokenizes to exactly
       the rljax batch (checked on TRL's collated batch).

TRL's Trainer-based classes do not start on accelerate >= 1.0 (the venv resolves 1.15): the
worker moves the four data-loader options transformers 4.38 passes to ``Accelerator()``
into a ``DataLoaderConfiguration`` (:func:`accelerate_compat`); the update is untouched.

Models (random N(0, 0.02) weights written once by rljax as an HF checkpoint that both
sides load; GPT-2's full vocabulary of 50257, so the tiny model is mostly its
12.9M-parameter embedding / LM head):

  tiny   GPT-2, 4 layers, d=256, 4 heads            (16M parameters)
  small  GPT-2-small shape: 12 layers, d=768, 12 heads (124M parameters)

Reported: median seconds per update after one warm-up update, throughput (SFT:
tokens/s = 8 x 128 / step; DPO: pairs/s), the ratio TRL / rljax (> 1: rljax is
faster) and rljax's one-off trace + XLA compile time (ahead of time,
``jit(...).lower(...).compile()``; DPO: train step + reference forward). TRL's
per-update time is taken between the HF Trainer callbacks ``on_step_begin`` and
``on_step_end`` (forward, backward, clipping, optimizer and scheduler step,
zero_grad; not the data loader or logging). The load average is printed: on a
shared machine both sides slow down, and not equally.

  python experiments/benchmarks/bench_trainers.py [--quick] [--models tiny,small]
      [--cases sft,dpo] [--steps 5] [--small-steps 3] [--threads 2]
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

BATCH, SEQ = 8, 128
PROMPT_LEN = ANSWER_LEN = 63  # BOS + prompt + answer + EOS = SEQ
VOCAB, EOS = 50257, 50256
BETA = 0.1
MODELS = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
}
CASES = ("sft", "dpo")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer timed updates: 3 for tiny, 1 for small (instead of --steps / --small-steps)")
    p.add_argument("--models", default="tiny,small", help="comma-separated subset of: tiny, small")
    p.add_argument("--cases", default="sft,dpo", help="comma-separated subset of: sft, dpo")
    p.add_argument("--steps", type=int, default=5, help="timed updates per side and case, tiny model (after 1 warm-up)")
    p.add_argument("--small-steps", type=int, default=3, help="timed updates per side and case, GPT-2-small shape")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks (default 2)")
    p.add_argument("--trl-python", default=os.path.join(ROOT, ".trl-venv", "bin", "python"), help="python of the TRL 0.7.11 venv")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    # internal: the TRL side, run by this script in the TRL venv
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# The shared batch (numpy only: runs in both venvs)
# ---------------------------------------------------------------------------


def sft_rows():
    """[BATCH, SEQ] int token ids: 8 full 128-token rows."""
    import numpy as np

    return np.random.RandomState(0).randint(0, EOS, (BATCH, SEQ))


def dpo_parts():
    """prompt, chosen, rejected token ids, each [BATCH, 63]."""
    import numpy as np

    rs = np.random.RandomState(1)
    return tuple(rs.randint(0, EOS, (BATCH, n)) for n in (PROMPT_LEN, ANSWER_LEN, ANSWER_LEN))


def dpo_batch():
    """The rljax DPO batch: chosen_/rejected_ input_ids, attention_mask, labels, each [BATCH, SEQ]
    int32, laid out as TRL's tokenize_row lays them out (BOS + prompt + answer + EOS, labels
    -100 on BOS + prompt)."""
    import numpy as np

    prompt, chosen, rejected = dpo_parts()
    bos = np.full((BATCH, 1), EOS)
    out = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        ids = np.concatenate([bos, prompt, answer, bos], axis=1).astype(np.int32)
        labels = ids.copy()
        labels[:, : 1 + PROMPT_LEN] = -100
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_labels"] = ids, np.ones_like(ids), labels
    return out


def same_rows(got, expected) -> bool:
    """Same rows up to order (the HF data loader shuffles the 8 examples)."""
    import numpy as np

    got, expected = np.asarray(got), np.asarray(expected)
    return got.shape == expected.shape and sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))


def median_after_warmup(times):
    return dict(first=times[0], median=statistics.median(times[1:]), times=times[1:])


# ---------------------------------------------------------------------------
# rljax side (this process)
# ---------------------------------------------------------------------------


def write_checkpoint(name: str, directory: str) -> None:
    """Random GPT-2 weights, HF's init (N(0, 0.02) matrices, unit norm scales, zero biases), saved by rljax."""
    import jax
    import jax.numpy as jnp

    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, bos_token_id=EOS, eos_token_id=EOS, **MODELS[name])
    module = model_from_config(cfg)
    params = init_params(module, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))

    def hf_init(path, x, key):
        name = path[-1].key
        if name == "scale":
            return jnp.ones_like(x)
        if name == "bias":
            return jnp.zeros_like(x)
        return 0.02 * jax.random.normal(key, x.shape, x.dtype)

    params = jax.tree_util.tree_unflatten(treedef, [hf_init(p, x, k) for (p, x), k in zip(leaves, keys)])
    save_pretrained(module, params, directory)


def aot_compile_seconds(jitted, *args) -> float:
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def rljax_side(model_dir: str, n: int, cases):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.dpo import make_dpo_loss, make_reference_logps_fn
    from rljax.models import from_pretrained
    from rljax.sft import make_sft_loss
    from rljax.train_state import TrainState
    from rljax.trainers.base import TrainingArguments, make_optimizer, make_train_step

    module, ref_params = from_pretrained(model_dir)
    args = TrainingArguments(per_device_train_batch_size=BATCH, max_steps=n + 1, seed=0)

    def fresh_state():  # the step donates its state: train a copy, keep ref_params alive
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), ref_params)
        return TrainState.create(params, make_optimizer(args, n + 1), jax.random.PRNGKey(args.seed))

    def run(step_once, state):
        times, losses = [], []
        for _ in range(n + 1):
            t0 = time.perf_counter()
            state, metrics = step_once(state)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
        print(f"  rljax: {' '.join(f'{t:.2f}' for t in times)} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
        return dict(median_after_warmup(times), loss=losses[0])

    out = {}
    if "sft" in cases:
        ids = sft_rows().astype(np.int32)
        batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=ids)
        train_step = make_train_step(make_sft_loss(module))
        state = fresh_state()
        compile_s = aot_compile_seconds(train_step, state, batch)
        out["sft"] = dict(run(lambda s: train_step(s, batch), state), compile=compile_s)
        del state

    if "dpo" in cases:
        pairs = dpo_batch()
        reference_logps = make_reference_logps_fn(module)
        train_step = make_train_step(make_dpo_loss(module, beta=BETA))

        def dpo_step(state):
            rc, rr = reference_logps(ref_params, pairs)
            return train_step(state, dict(pairs, reference_chosen_logps=rc, reference_rejected_logps=rr))

        state = fresh_state()
        ref_shape = jax.ShapeDtypeStruct((BATCH,), jnp.float32)
        compile_s = aot_compile_seconds(reference_logps, ref_params, pairs) + aot_compile_seconds(
            train_step, state, dict(pairs, reference_chosen_logps=ref_shape, reference_rejected_logps=ref_shape))
        out["dpo"] = dict(run(dpo_step, state), compile=compile_s)
        del state
    return out


# ---------------------------------------------------------------------------
# TRL side (the TRL venv, a subprocess)
# ---------------------------------------------------------------------------


def word_tokenizer():
    """Word-level stand-in for GPT-2's tokenizer (no hub access): "t<id>" -> id, "<|endoftext|>" -> 50256
    (bos = eos = pad, as GPT-2)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(EOS)}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)


def accelerate_compat() -> bool:
    """Let transformers 4.38's Trainer start on accelerate >= 1.0 (the TRL venv resolves 1.15).

    Its ``create_accelerator_and_postprocess`` passes ``split_batches``, ``dispatch_batches``,
    ``even_batches`` and ``use_seedable_sampler`` to ``Accelerator()``; accelerate 1.0 moved them
    into a ``DataLoaderConfiguration``. This moves them there (same values, same meaning); the
    training step itself is untouched. Returns whether the adapter was needed."""
    import inspect

    import accelerate
    import transformers.trainer

    if "dispatch_batches" in inspect.signature(accelerate.Accelerator.__init__).parameters:
        return False
    moved = ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler")

    class Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            loader = {k: kwargs.pop(k) for k in moved if k in kwargs}
            if loader:
                kwargs["dataloader_config"] = accelerate.DataLoaderConfiguration(**loader)
            super().__init__(*args, **kwargs)

    transformers.trainer.Accelerator = Accelerator
    return True


def trl_side(model_dir: str, n: int, cases, threads: int):
    import torch

    torch.set_num_threads(threads)
    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    adapted = accelerate_compat()
    tokenizer = word_tokenizer()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        targs = dict(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=n + 1, logging_steps=1,
                     save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0,
                     use_cpu=True)
        if "sft" in cases:
            ids = torch.tensor(sft_rows(), dtype=torch.long)
            rows = Rows([dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r) for r in ids])
            timer = StepTimer()
            trainer = trl.SFTTrainer(
                AutoModelForCausalLM.from_pretrained(model_dir), args=TrainingArguments(**targs), train_dataset=rows,
                tokenizer=tokenizer, packing=True, max_seq_length=SEQ, callbacks=[timer],
            )
            first = next(iter(trainer.get_train_dataloader()))
            check = same_rows(first["input_ids"], sft_rows()) and same_rows(first["labels"], sft_rows())
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            print(f"  TRL: {' '.join(f'{t:.2f}' for t in timer.times)} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                  file=sys.stderr, flush=True)
            out["sft"] = dict(median_after_warmup(timer.times), loss=losses[0], same_batch=check)
            del trainer

        if "dpo" in cases:
            words = lambda row: " ".join(f"t{i}" for i in row)  # noqa: E731
            prompt, chosen, rejected = dpo_parts()
            data = datasets.Dataset.from_dict({
                "prompt": [words(r) for r in prompt],
                "chosen": [" " + words(r) for r in chosen],
                "rejected": [" " + words(r) for r in rejected],
            })
            timer = StepTimer()
            trainer = trl.DPOTrainer(
                AutoModelForCausalLM.from_pretrained(model_dir), ref_model=None, beta=BETA,
                args=TrainingArguments(**targs, remove_unused_columns=False), train_dataset=data,
                tokenizer=tokenizer, max_length=SEQ, max_prompt_length=1 + PROMPT_LEN, callbacks=[timer],
            )
            first = next(iter(trainer.get_train_dataloader()))
            expected = dpo_batch()
            check = all(same_rows(first[k], expected[k]) for k in expected)
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            print(f"  TRL: {' '.join(f'{t:.2f}' for t in timer.times)} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                  file=sys.stderr, flush=True)
            out["dpo"] = dict(median_after_warmup(timer.times), loss=losses[0], same_batch=check)
            del trainer
    out["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "accelerate": accelerate.__version__ + (" (Trainer adapter)" if adapted else ""),
                       "torch_threads": torch.get_num_threads()}
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def pin_threads(n: int) -> None:
    """Restrict this process (and so the TRL subprocess) to n CPUs before jax starts: XLA sizes its
    thread pool from the schedulable CPUs. One CPU device, as a user runs it (XLA_FLAGS dropped)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.pop("XLA_FLAGS", None)


def run_trl(python: str, model_dir: str, n: int, cases, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [python, os.path.abspath(__file__), "--trl-worker", "--model-dir", model_dir, "--steps", str(n),
           "--cases", ",".join(cases), "--threads", str(threads)]
    print(f"[trl] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"TRL worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in CASES for c in cases):
        raise SystemExit(f"--cases: choose from {CASES}, got {cases}")
    if args.trl_worker:
        print(json.dumps(trl_side(args.model_dir, args.steps, cases, args.threads)))
        return
    if not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} not found: create the TRL venv with experiments/benchmarks/trl_env.sh")
    pin_threads(args.threads)
    import flax
    import jax
    import optax

    load_start = os.getloadavg()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows, versions, loads = [], {}, []
    for name in models:
        n = (3 if name == "tiny" else 1) if args.quick else (args.steps if name == "tiny" else args.small_steps)
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(name, d)
            print(f"[rljax] {name}: {', '.join(cases)}, 1 warm-up + {n} timed updates", file=sys.stderr, flush=True)
            loads.append(os.getloadavg()[0])
            ours = rljax_side(d, n, cases)
            jax.clear_caches()
            loads.append(os.getloadavg()[0])
            theirs = run_trl(args.trl_python, d, n, cases, args.threads)
        versions.update(theirs.pop("versions"))
        for case in cases:
            rows.append((case, name, n, ours[case], theirs[case]))
    load_end = os.getloadavg()

    lines = [
        f"SFT and DPO updates, rljax vs TRL 0.7.11 (PyTorch), CPU, {args.threads} threads for both, float32, "
        f"batch {BATCH} x {SEQ} tokens (DPO: {BATCH} pairs x {SEQ}){' (--quick)' if args.quick else ''}",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}); load average (1 min) at start {load_start[0]:.1f}, "
        f"before each side {' / '.join(f'{x:.1f}' for x in loads)}, at end {load_end[0]:.1f} (shared machine: noisy)",
        f"- versions: jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}; "
        f"{', '.join(f'{k} {v}' for k, v in versions.items())}; python {platform.python_version()}",
        "- TRL side: `trl.SFTTrainer(packing=True)` / `trl.DPOTrainer(ref_model=None)` `.train()` with max_steps, "
        "timed per update between Trainer callbacks; rljax side: `make_sft_loss` / `make_dpo_loss` + "
        "`make_reference_logps_fn`, `make_train_step`, timed to `block_until_ready`",
        "- medians after 1 warm-up update; throughput: SFT tokens/s (8 x 128 per update), DPO pairs/s; "
        "TRL / rljax > 1 means rljax is faster; first-update loss of each side as a sanity check",
        "",
        "| case | model | timed updates | rljax s/update | TRL s/update | rljax throughput | TRL throughput "
        "| TRL / rljax | rljax compile s | first loss rljax / TRL | same batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rate = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:.3g}"  # noqa: E731
    shape = {k: f"{v['n_layer']} layers, d={v['n_embd']}" for k, v in MODELS.items()}
    for case, name, n, ours, theirs in rows:
        per = BATCH * SEQ if case == "sft" else BATCH
        unit = "tok/s" if case == "sft" else "pairs/s"
        lines.append(
            f"| {case.upper()} | {name} ({shape[name]}) | {n} | {ours['median']:.3f} | {theirs['median']:.3f} "
            f"| {rate(per / ours['median'])} {unit} | {rate(per / theirs['median'])} {unit} "
            f"| {theirs['median'] / ours['median']:.2f}x | {ours['compile']:.1f} "
            f"| {ours['loss']:.4f} / {theirs['loss']:.4f} | {'yes' if theirs['same_batch'] else 'NO'} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
