"""Tiny offline stand-ins for what TRL's examples download, so every script in
``experiments/`` runs without a hub:

============================================  =====================================================
TRL's example uses (hub)                      offline stand-in (``offline_assets()``)
============================================  =====================================================
``gpt2`` / ``facebook/opt-350m`` + tokenizer  ``model``: a 2-layer GPT-2 (random init) and a BPE
                                              tokenizer trained on the texts below, in HF format
``timdettmers/openassistant-guanaco``         ``reviews``: a directory of train/test ``.jsonl``
                                              with a ``text`` column (templated film reviews)
``imdb``                                      ``imdb``: ``train.jsonl`` with ``text`` (several
                                              reviews, > 200 characters as TRL filters) + ``label``
``Anthropic/hh-rlhf``                         ``hh-rlhf``: train/test ``.jsonl`` of ``chosen`` /
                                              ``rejected`` dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...")
``lvwerra/distilbert-imdb`` classifier        ``pipeline("sentiment-analysis", model="vader")``: VADER
                                              scores in the pipeline's output format
============================================  =====================================================

The texts come from the quickstart's builders (``quickstart.build_data``: reviews whose
preferences VADER decides). Assets are built once per directory (``RLJAX_OFFLINE_ASSETS`` or
``runs/offline_assets``) and reused. A script runs offline when its model flag
(``--model_name_or_path``; ``--model_name`` for ppo.py) is not given:
``set_offline_defaults(parser, script)`` then points the parser's defaults at these assets and at
budgets sized for 2 CPU cores; every flag given on the command line still wins.
"""
from __future__ import annotations

import json
import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

ASSETS_ENV = "RLJAX_OFFLINE_ASSETS"
SFT_OUTPUT = os.path.join("runs", "sft")  # where scripts/sft.py writes offline; later scripts start from it
VADER = "vader"
_DONE = "ASSETS_COMPLETE"


def assets_dir() -> str:
    return os.environ.get(ASSETS_ENV) or os.path.join("runs", "offline_assets")


def offline_assets(
    root: Optional[str] = None,
    *,
    seed: int = 0,
    n_reviews: int = 1200,
    n_pairs: int = 600,
    n_imdb: int = 960,
    vocab_size: int = 512,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 64,
) -> Dict[str, str]:
    """Paths of the offline assets (see the module docstring), built under ``root`` when missing."""
    root = root or assets_dir()
    paths = {name: os.path.join(root, name) for name in ("model", "reviews", "imdb", "hh-rlhf")}
    if os.path.exists(os.path.join(root, _DONE)):
        return paths
    import jax
    from quickstart import build_data, make_review, sentiment_judge

    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config

    os.makedirs(root, exist_ok=True)
    reviews, pairs = build_data(seed, n_reviews, n_pairs)
    rng, judge = random.Random(seed + 1), sentiment_judge()
    imdb = []
    while len(imdb) < n_imdb:
        text = " ".join(make_review(rng) for _ in range(6))
        if len(text) > 200:  # TRL's ppo.py keeps reviews longer than 200 characters
            imdb.append({"text": text, "label": int(judge(text) > 0)})
    hh = [_hh_row(p) for p in pairs]
    tokenizer = train_tokenizer(reviews + [r["chosen"] for r in hh] + [r["rejected"] for r in hh], vocab_size=vocab_size)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    module = model_from_config(cfg)
    save_pretrained(module, init_params(module, jax.random.PRNGKey(seed)), paths["model"], overwrite=True)
    tokenizer.save_pretrained(paths["model"])
    n_test = max(len(reviews) // 10, 1)
    _write_splits(paths["reviews"], {"train": [{"text": r} for r in reviews[n_test:]],
                                     "test": [{"text": r} for r in reviews[:n_test]]})
    _write_splits(paths["imdb"], {"train": imdb})
    n_test = max(len(hh) // 10, 1)
    _write_splits(paths["hh-rlhf"], {"train": hh[n_test:], "test": hh[:n_test]})
    with open(os.path.join(root, _DONE), "w") as f:
        f.write("ok\n")
    print(f"[offline] wrote {root}: tiny GPT-2 + tokenizer (vocab {len(tokenizer)}), {len(reviews)} reviews, "
          f"{len(imdb)} imdb-like texts, {len(hh)} hh-rlhf-like preference pairs")
    return paths


def _hh_row(pair: Dict[str, str]) -> Dict[str, str]:
    """A quickstart preference pair as an Anthropic/hh-rlhf row (full dialogues, shared prompt)."""
    prompt = f"\n\nHuman: Write a short review of {pair['prompt']}.\n\nAssistant: {pair['prompt']}"
    return {"chosen": prompt + pair["chosen"], "rejected": prompt + pair["rejected"]}


def _write_splits(directory: str, splits: Dict[str, List[dict]]) -> None:
    """``directory/<split>.jsonl``: ``datasets.load_dataset(directory)`` reads the splits back."""
    os.makedirs(directory, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def has_flag(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` is among the command-line arguments, also as ``--name=...`` or as an
    abbreviation argparse accepts (TRL's CI passes ``--model_name`` to sft.py for
    ``--model_name_or_path``)."""
    for a in argv:
        option = a.split("=", 1)[0]
        if option.startswith("--") and len(option) > 2 and f"--{name}".startswith(option):
            return True
    return False


def trained_policy(assets: Dict[str, str]) -> str:
    """The SFT model scripts/sft.py writes offline (``runs/sft``) when present, else the random tiny GPT-2."""
    return SFT_OUTPUT if os.path.exists(os.path.join(SFT_OUTPUT, "model.safetensors")) else assets["model"]


def _defaults(script: str, assets: Dict[str, str]) -> Dict[str, Any]:
    if script == "sft":
        return dict(model_name_or_path=assets["model"], dataset_name=assets["reviews"], max_seq_length=64,
                    output_dir=SFT_OUTPUT, learning_rate=3e-3, per_device_train_batch_size=32, max_steps=150,
                    warmup_steps=10, logging_steps=25, save_strategy="no")
    if script == "reward_modeling":
        return dict(model_name_or_path=trained_policy(assets), output_dir="runs/reward_modeling", max_length=64,
                    learning_rate=1e-3, per_device_train_batch_size=32, max_steps=120, logging_steps=20,
                    save_strategy="no")
    if script == "dpo":
        return dict(model_name_or_path=trained_policy(assets), output_dir="runs/dpo", max_length=64,
                    max_prompt_length=32, learning_rate=5e-4, per_device_train_batch_size=32, max_steps=60,
                    logging_steps=10, save_strategy="no")
    if script == "ppo":
        return dict(model_name=trained_policy(assets), query_dataset=assets["imdb"],
                    reward_model=f"sentiment-analysis:{VADER}", learning_rate=3e-4, batch_size=32, mini_batch_size=8,
                    init_kl_coef=0.1)
    raise ValueError(f"Unknown script {script!r}.")


def set_offline_defaults(parser: Any, script: str, argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, str]]:
    """Offline (the script's model flag not given): build/reuse the assets, make them and the
    tiny budgets the ``parser``'s defaults (``argparse.ArgumentParser.set_defaults``) and return
    the asset paths; online: change nothing and return None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if has_flag(argv, "model_name" if script == "ppo" else "model_name_or_path"):
        return None
    assets = offline_assets()
    defaults = _defaults(script, assets)
    parser.set_defaults(**defaults)
    model = defaults.get("model_name_or_path") or defaults.get("model_name")
    print(f"[offline] {script}: model {model}, tiny local data in {assets_dir()} (flags override)")
    return assets


class VaderSentimentPipeline:
    """``pipeline("sentiment-analysis")`` stand-in: VADER's compound score ``c`` in [-1, 1] as
    ``[{"label": "NEGATIVE", "score": -c}, {"label": "POSITIVE", "score": c}]`` per text (the
    layout TRL's ppo.py reads with ``output[1]["score"]``)."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from quickstart import sentiment_judge

        self._judge = sentiment_judge()
        self.tokenizer = SimpleNamespace(pad_token_id=None)
        self.model = SimpleNamespace(config=SimpleNamespace(pad_token_id=None))

    def __call__(self, texts, return_all_scores: bool = True, function_to_apply: str = "none", batch_size: int = 16,
                 **_: Any):
        single = isinstance(texts, str)
        out = []
        for text in [texts] if single else texts:
            c = float(self._judge(text))
            scores = [{"label": "NEGATIVE", "score": -c}, {"label": "POSITIVE", "score": c}]
            out.append(scores if return_all_scores else max(scores, key=lambda s: s["score"]))
        return out[0] if single else out


def pipeline(task: str, model: Optional[str] = None, device: Any = None, **kwargs: Any):
    """``transformers.pipeline``, except ``model="vader"`` gives the offline sentiment stand-in."""
    if model == VADER:
        if task not in ("sentiment-analysis", "text-classification"):
            raise ValueError(f"The offline {VADER!r} model only does sentiment-analysis, not {task!r}.")
        return VaderSentimentPipeline()
    from transformers import pipeline as hf_pipeline

    return hf_pipeline(task, model=model, device=device, **kwargs)
