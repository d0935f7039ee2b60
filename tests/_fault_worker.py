"""Training subprocess for tests/test_fault_injection.py: a tiny run that can be killed
(SIGKILL, no cleanup) or made to fail at a chosen point, then resumed.

    python tests/_fault_worker.py sft OUT_DIR [--resume]
    python tests/_fault_worker.py ppo OUT_DIR ASSETS_DIR [--resume]

``KILL_AT=<point>:<step>`` picks the fault:
  step:N          SIGKILL inside train update N (before it runs: nothing of it survives)
  hf:N            SIGKILL after checkpoint-N's HF model is written, before its train state
  orbax:N         SIGKILL inside orbax's write of step N (leaves N.orbax-checkpoint-tmp-*)
  save:N          SIGKILL after orbax finished step N, before the rljax commit marker
  after_commit:N  SIGKILL right after step N's commit marker is written
  enospc:N        the write of step N raises OSError(ENOSPC) (a full disk)
On success the final params are written to OUT_DIR/final_params.npz (flattened paths).
"""
from __future__ import annotations

import errno
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

SFT_STEPS, SFT_SAVE_STEPS = 8, 2
TEXTS = [
    "the movie was great and the acting was wonderful",
    "the film was terrible and the plot was boring",
    "i loved this movie , a great story",
    "i hated this film , a boring mess",
    "what a wonderful and happy experience",
    "what an awful and sad experience",
    "Question: what is two plus two ? Answer: four",
    "### Human: hello there ### Assistant: hi , how can i help ?",
]


def _die(why: str) -> None:
    print(f"[fault_worker] SIGKILL at {why}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults(kill_at: str) -> None:
    """Monkeypatch the chosen point to SIGKILL this process (or raise ENOSPC)."""
    if not kill_at:
        return
    point, _, n = kill_at.partition(":")
    n = int(n)
    from rljax import checkpoint as C

    if point in ("save", "after_commit"):
        original = C.write_commit_marker

        def marker(step_dir, step, checksums=True):
            if int(step) == n and point == "save":
                _die(f"save:{n} (files written, no commit marker)")
            original(step_dir, step, checksums)
            if int(step) == n:
                _die(f"after_commit:{n}")

        C.write_commit_marker = marker
    elif point in ("orbax", "enospc"):
        from orbax.checkpoint._src.path import async_path

        original_rename = async_path.rename

        async def rename(src, dst):
            if os.path.basename(str(dst)) == str(n):
                if point == "orbax":
                    _die(f"orbax:{n} (mid-write, tmp directory left behind)")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
            return await original_rename(src, dst)

        async_path.rename = rename
    elif point == "hf":
        from rljax.trainers import base

        original_save = base.save_train_state

        def save_train_state(checkpoint_dir, state, step, *a, **k):
            if int(step) == n:
                _die(f"hf:{n} (HF model written, no train state)")
            return original_save(checkpoint_dir, state, step, *a, **k)

        base.save_train_state = save_train_state
    elif point == "step":
        pass  # installed by the run function (it knows the step)
    else:
        raise SystemExit(f"unknown KILL_AT point {point!r}")


def _flat(params) -> dict:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def run_sft(out_dir: str, resume: bool, kill_at: str) -> None:
    import jax

    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.trainers.sft import SFTConfig, SFTTrainer

    tok = train_tokenizer(TEXTS * 4, vocab_size=128)
    module = model_from_config(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    params = init_params(module, jax.random.PRNGKey(0))
    args = SFTConfig(output_dir=out_dir, max_steps=SFT_STEPS, save_steps=SFT_SAVE_STEPS, logging_steps=1,
                     per_device_train_batch_size=2, learning_rate=1e-3, max_seq_length=16, pad_to_multiple_of=16,
                     dataset_text_field="text", disable_tqdm=True, report_to=["none"])
    trainer = SFTTrainer((module, params), args, train_dataset=[{"text": t} for t in TEXTS], tokenizer=tok)
    point, _, n = kill_at.partition(":")
    if point == "step":
        build = trainer._build_train_step

        def build_with_kill(*a, **k):
            step_fn = build(*a, **k)

            def wrapped(state, batch):
                if int(state.step) + 1 == int(n):
                    _die(f"step:{n} (mid-step)")
                return step_fn(state, batch)

            return wrapped

        trainer._build_train_step = build_with_kill
    trainer.train(resume_from_checkpoint=True if resume else None)
    np.savez(os.path.join(out_dir, "final_params.npz"), **_flat(trainer.params))


def run_ppo(out_dir: str, assets: str, resume: bool, kill_at: str) -> None:
    from rljax import cli

    def load_tokenizer(script, command):  # not under test: the fast class directly skips AutoTokenizer's torch import
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(script.model_name_or_path)

    cli.load_tokenizer = load_tokenizer
    point, _, n = kill_at.partition(":")
    if point == "step":  # the iteration's update ran, its stats are being logged: before any save of it
        from rljax import logging as L

        log = L.MetricLogger.log

        def log_with_kill(self, metrics, step, *a, **k):
            if int(step) == int(n):
                _die(f"step:{n} (mid-iteration)")
            return log(self, metrics, step, *a, **k)

        L.MetricLogger.log = log_with_kill
    argv = ["ppo", "--model_name_or_path", os.path.join(assets, "model"), "--reward_model", os.path.join(assets, "rm"),
            "--dataset_name", os.path.join(assets, "texts.jsonl"), "--batch_size", "4", "--mini_batch_size", "2",
            "--ppo_epochs", "1", "--max_prompt_length", "3", "--max_new_tokens", "3", "--learning_rate", "1e-3",
            "--steps_per_call", "1", "--save_steps", "1", "--sample_every", "100", "--log_with", "jsonl",
            "--steps", "16", "--output_dir", out_dir]
    if resume:
        argv += ["--resume_from_checkpoint", out_dir]
    cli.main(argv)
    from safetensors.numpy import load_file

    np.savez(os.path.join(out_dir, "final_params.npz"), **load_file(os.path.join(out_dir, "model.safetensors")))


def make_ppo_assets(root: str) -> None:
    """A 1-layer GPT-2 + tokenizer (``model/``), a reward model over the same trunk (``rm/``)
    and a prompt file (``texts.jsonl``) under ``root``."""
    import json

    import jax

    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import sequence_score_from_pretrained

    tok = train_tokenizer(TEXTS * 4, vocab_size=96)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    module = model_from_config(cfg)
    model_dir = os.path.join(root, "model")
    save_pretrained(module, init_params(module, jax.random.PRNGKey(0)), model_dir)
    tok.save_pretrained(model_dir)
    score_module, score_params = sequence_score_from_pretrained(model_dir, num_labels=1, rng=jax.random.PRNGKey(1))
    save_pretrained(score_module, score_params, os.path.join(root, "rm"))
    with open(os.path.join(root, "texts.jsonl"), "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")


def main(argv) -> None:
    kind, out_dir = argv[0], argv[1]
    resume = "--resume" in argv
    kill_at = os.environ.get("KILL_AT", "")
    install_faults(kill_at)
    if kind == "sft":
        run_sft(out_dir, resume, kill_at)
    elif kind == "ppo_assets":
        make_ppo_assets(out_dir)
    elif kind == "ppo":
        run_ppo(out_dir, argv[2], resume, kill_at)
    else:
        raise SystemExit(f"unknown run kind {kind!r}")
    print("[fault_worker] finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
