"""Offline assets shared by the experiment scripts: the quickstart's VADER-built reviews and
preference pairs (``quickstart.build_data``), a BPE tokenizer trained on them and a tiny,
randomly initialised GPT-2, written as files the ``rljax`` CLI reads (an HF model directory,
``reviews.jsonl``, ``pairs.json``). Built once per directory and reused.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

DEFAULT_DIR = os.path.join("runs", "offline_assets")


def offline_assets(root: str = DEFAULT_DIR, seed: int = 0, n_reviews: int = 1200, n_pairs: int = 600) -> Dict[str, str]:
    """Paths of ``model`` (tiny GPT-2 + tokenizer), ``reviews`` (.jsonl, ``text`` ending in eos)
    and ``pairs`` (.json, ``train``/``test`` splits of prompt/chosen/rejected)."""
    paths = {
        "model": os.path.join(root, "tiny_gpt2"),
        "reviews": os.path.join(root, "reviews.jsonl"),
        "pairs": os.path.join(root, "pairs.json"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import jax

    from quickstart import build_data
    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config

    os.makedirs(root, exist_ok=True)
    reviews, pairs = build_data(seed, n_reviews, n_pairs)
    tokenizer = train_tokenizer(reviews, vocab_size=512)
    cfg = GPT2Config(  # the quickstart's shape
        vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    module = model_from_config(cfg)
    save_pretrained(module, init_params(module, jax.random.PRNGKey(seed)), paths["model"], overwrite=True)
    tokenizer.save_pretrained(paths["model"])
    _write_jsonl(paths["reviews"], [{"text": r + tokenizer.eos_token} for r in reviews])  # eos: learn to stop
    n_test = max(len(pairs) // 10, 1)
    with open(paths["pairs"], "w") as f:
        json.dump({"train": pairs[n_test:], "test": pairs[:n_test]}, f)
    print(f"[offline] wrote {root}: tiny GPT-2 + tokenizer (vocab {len(tokenizer)}), {len(reviews)} reviews, "
          f"{len(pairs)} preference pairs")
    return paths


def _write_jsonl(path: str, rows: List[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def has_flag(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` (or ``--name=...``) is among the arguments, or set by a --config YAML file."""
    if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
        return True
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else (a.split("=", 1)[1] if a.startswith("--config=") else None)
        if path and os.path.isfile(path):
            import yaml

            with open(path) as f:
                if name in (yaml.safe_load(f) or {}):
                    return True
    return False


def sft_checkpoint(output_dir: str = os.path.join("runs", "sft")) -> str:
    """A directory holding an SFT'd tiny policy: ``output_dir`` when experiments/sft.py already
    wrote one there, else trained now with its offline defaults."""
    if not os.path.exists(os.path.join(output_dir, "model.safetensors")):
        import sft

        print(f"[offline] no SFT model in {output_dir}: running experiments/sft.py first")
        sft.main(["--output_dir", output_dir])
    return output_dir
