"""Tokenization of SFT, preference (reward) and DPO data sets, and a local BPE tokenizer trainer.

Part of :mod:`rljax.data` (its docstring has the conventions: NumPy int32 out,
bucketed lengths, deliberate differences from TRL 0.7.11).
"""
from __future__ import annotations

import warnings

from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
)

from transformers import PreTrainedTokenizerFast

from rljax.data.collators import _REWARD_KEYS


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 256,
    *,
    pad_token: str = "<pad>",
    eos_token: str = "<|endoftext|>",
    bos_token: Optional[str] = "<s>",
    unk_token: str = "<unk>",
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline and wrap it as an HF fast tokenizer.

    Used by the tests and the offline demo (no hub access). Special tokens take
    the first ids: pad=0, eos=1, bos=2 (when given), unk=3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [pad_token, eos_token] + ([bos_token] if bos_token else []) + [unk_token]
    specials += list(extra_special_tokens)
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        warnings.warn(
            f"train_tokenizer: vocab_size={vocab_size} is below the byte-level alphabet (256) plus the special tokens; "
            f"the tokenizer has {tok.get_vocab_size()} tokens. Size models with vocab_size=len(tokenizer).",
            UserWarning,
        )
    kwargs = dict(pad_token=pad_token, eos_token=eos_token, unk_token=unk_token)
    if bos_token:
        kwargs["bos_token"] = bos_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _column_batches(dataset: Any, batch_size: int) -> Iterator[Dict[str, list]]:
    """Yield ``{column: [values]}`` slices of a ``datasets.Dataset`` or a list of dicts."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if isinstance(dataset, (list, tuple)):
            rows = dataset[start:stop]
            keys = list(rows[0].keys()) if rows else []
            yield {k: [r[k] for r in rows] for k in keys}
        else:
            yield dict(dataset[start:stop])


def _column_names(dataset: Any) -> List[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list(dataset[0].keys()) if len(dataset) else []


def tokenize_sft_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    dataset_text_field: Optional[str] = None,
    formatting_func: Optional[Callable[[Dict[str, list]], List[str]]] = None,
    max_seq_length: int,
    add_special_tokens: bool = True,
    remove_unused_columns: bool = True,
    dataset_batch_size: int = 1000,
    num_proc: Optional[int] = None,
):
    """SFTTrainer's non-packed preprocessing: tokenize, truncate to ``max_seq_length``, no padding.

    ``dataset`` is a ``datasets.Dataset`` or a list of dicts. The text comes from
    ``dataset[dataset_text_field]`` or from ``formatting_func(batch)`` where
    ``batch`` maps column -> list of values (``dataset_batch_size`` rows) and
    must return a list of strings. As in TRL the field wins when both are given.

    Returns a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``
    (ragged lists of ints), plus the original columns if
    ``remove_unused_columns`` is False. ``num_proc > 1`` tokenizes with
    ``datasets.Dataset.map`` in that many worker processes (TRL's ``dataset_num_proc``).

    Raises:
        ValueError: neither field nor function given (TRL 0.7.11 would try to
            infer a chat format; we ask explicitly), the field is not a column,
            or ``formatting_func`` does not return a list.
    """
    from datasets import Dataset

    if dataset_text_field is None and formatting_func is None:
        raise ValueError(
            "tokenize_sft_dataset needs the text: pass `dataset_text_field` (name of a text column) "
            "or `formatting_func` (batch dict -> list of strings), or pack with `pack_sequences`."
        )
    columns = _column_names(dataset)
    use_func = formatting_func is not None and dataset_text_field is None
    if not use_func and dataset_text_field not in columns:
        raise ValueError(
            f"dataset_text_field {dataset_text_field!r} is not a column of the dataset (columns: {columns})"
        )

    if dataset_batch_size is None or dataset_batch_size <= 0:  # TRL: the whole dataset as one batch
        dataset_batch_size = max(len(dataset), 1)

    def tokenize_batch(batch: Dict[str, list]) -> Dict[str, list]:
        if use_func:
            texts = formatting_func(batch)
            if not isinstance(texts, list):
                raise ValueError(
                    "The `formatting_func` should return a list of processed strings "
                    f"(got {type(texts).__name__}), since anything else can lead to silent bugs."
                )
        else:
            texts = batch[dataset_text_field]
        enc = tokenizer(
            texts,
            add_special_tokens=add_special_tokens,
            truncation=True,
            padding=False,
            max_length=max_seq_length,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    if num_proc is not None and num_proc > 1:  # datasets.map in worker processes, as TRL
        ds = dataset if isinstance(dataset, Dataset) else Dataset.from_list(list(dataset))
        return ds.map(
            tokenize_batch, batched=True, batch_size=dataset_batch_size, num_proc=num_proc,
            remove_columns=ds.column_names if remove_unused_columns else None,
        )
    out: Dict[str, list] = {"input_ids": [], "attention_mask": []}
    kept = [c for c in columns if c not in ("input_ids", "attention_mask")] if not remove_unused_columns else []
    for c in kept:
        out[c] = []
    for batch in _column_batches(dataset, dataset_batch_size):
        enc = tokenize_batch(batch)
        out["input_ids"].extend(enc["input_ids"])
        out["attention_mask"].extend(enc["attention_mask"])
        for c in kept:
            out[c].extend(batch[c])
    return Dataset.from_dict(out)


def tokenize_preference_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: Optional[int] = None,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    add_special_tokens: bool = True,
):
    """Text pairs -> TRL's reward columns.

    Each row's ``chosen``/``rejected`` text (prefixed with ``prompt`` when that
    column exists) is tokenized, truncated to ``max_length`` tokens, and stored
    as ``input_ids_chosen``, ``attention_mask_chosen``, ``input_ids_rejected``,
    ``attention_mask_rejected``; a ``margin`` column is carried over. Returns a
    ``datasets.Dataset``.
    """
    from datasets import Dataset

    columns = _column_names(dataset)
    for c in (chosen_field, rejected_field):
        if c not in columns:
            raise ValueError(f"Preference data needs a {c!r} column (columns: {columns})")
    has_prompt = prompt_field in columns
    out: Dict[str, list] = {k: [] for k in _REWARD_KEYS}
    if "margin" in columns:
        out["margin"] = []
    kw = dict(add_special_tokens=add_special_tokens, truncation=max_length is not None, max_length=max_length)
    for batch in _column_batches(dataset, 1000):
        prompts = batch[prompt_field] if has_prompt else [""] * len(batch[chosen_field])
        for side in ("chosen", "rejected"):
            texts = [p + t for p, t in zip(prompts, batch[chosen_field if side == "chosen" else rejected_field])]
            enc = tokenizer(texts, **kw)
            out[f"input_ids_{side}"].extend(enc["input_ids"])
            out[f"attention_mask_{side}"].extend(enc["attention_mask"])
        if "margin" in out:
            out["margin"].extend(batch["margin"])
    return Dataset.from_dict(out)


def _build_tokenized_answer(tokenizer: Any, prompt: str, answer: str) -> Dict[str, List[int]]:
    """Tokenize ``prompt + answer`` jointly and split where the prompt ends.

    ``enc(a + b)`` need not equal ``enc(a) + enc(b)``; the split point is
    ``len(enc(a))``, moved back by one when the joint tokenization merged the
    prompt's last token with the answer.
    """
    full = tokenizer(prompt + answer, add_special_tokens=False)
    full_ids, full_mask = list(full["input_ids"]), list(full["attention_mask"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) > len(full_ids):
        raise ValueError("Prompt input ids and answer input ids should have the same length.")
    split = len(prompt_ids)
    if prompt_ids != full_ids[:split]:
        split -= 1
    return {
        "prompt_input_ids": full_ids[:split],
        "prompt_attention_mask": full_mask[:split],
        "input_ids": full_ids[split:],
        "attention_mask": full_mask[split:],
    }


def dpo_tokenize_row(
    feature: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 128,
    truncation_mode: str = "keep_end",
    label_pad_token_id: int = -100,
) -> Dict[str, List[int]]:
    """TRL 0.7.11 ``DPOTrainer.tokenize_row`` for decoder-only models.

    ``feature`` has string ``prompt``, ``chosen``, ``rejected``. Steps (as TRL):
    joint prompt+answer tokenization split at the prompt (see
    :func:`_build_tokenized_answer`); the standalone prompt is cut to the
    shorter of the two answer-side prompts (they may differ by at most one
    token); BOS before each prompt; EOS after each answer; if ``prompt +
    longer answer > max_length`` the prompt keeps its first (``keep_start``) or
    last (``keep_end``) ``max_prompt_length`` tokens, and if still too long the
    answers keep their first ``max_length - max_prompt_length`` tokens. Labels
    are prompt+answer ids with prompt positions = ``label_pad_token_id``.

    Our fix: BOS is added only when the tokenizer has one, and not when the
    prompt already starts with it (TRL adds ``bos_token_id`` unconditionally).

    Returns lists: ``chosen_input_ids``, ``chosen_attention_mask``,
    ``chosen_labels``, ``rejected_*`` likewise, ``prompt_input_ids``,
    ``prompt_attention_mask``.
    """
    prompt, chosen, rejected = feature["prompt"], feature["chosen"], feature["rejected"]
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise ValueError(f"{name} should be an str but got {type(value)}")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"Unknown truncation mode: {truncation_mode}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("DPO tokenization appends EOS to each answer, but the tokenizer has no eos_token.")
    bos = getattr(tokenizer, "bos_token_id", None)

    p_enc = tokenizer(prompt, add_special_tokens=False)
    prompt_tokens = {
        "prompt_input_ids": list(p_enc["input_ids"]),
        "prompt_attention_mask": list(p_enc["attention_mask"]),
    }
    chosen_tokens = _build_tokenized_answer(tokenizer, prompt, chosen)
    rejected_tokens = _build_tokenized_answer(tokenizer, prompt, rejected)

    c_len, r_len = len(chosen_tokens["prompt_input_ids"]), len(rejected_tokens["prompt_input_ids"])
    n_prompt = min(c_len, r_len)
    prompt_tokens = {k: v[:n_prompt] for k, v in prompt_tokens.items()}
    n_diff = sum(a != b for a, b in zip(chosen_tokens["prompt_input_ids"], rejected_tokens["prompt_input_ids"]))
    if n_diff > 1 or abs(c_len - r_len) > 1:
        raise ValueError(
            "Chosen and rejected prompt_input_ids might only differ on the last token due to tokenizer merge ops."
        )

    for toks in (prompt_tokens, chosen_tokens, rejected_tokens):
        ids = toks["prompt_input_ids"]
        if bos is not None and not (ids and ids[0] == bos):
            toks["prompt_input_ids"] = [bos] + ids
            toks["prompt_attention_mask"] = [1] + toks["prompt_attention_mask"]
    for toks in (chosen_tokens, rejected_tokens):
        toks["input_ids"] = toks["input_ids"] + [eos]
        toks["attention_mask"] = toks["attention_mask"] + [1]

    longer = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    for toks in (chosen_tokens, rejected_tokens, prompt_tokens):
        if len(toks["prompt_input_ids"]) + longer > max_length:
            for k in ("prompt_input_ids", "prompt_attention_mask"):
                if truncation_mode == "keep_start":
                    toks[k] = toks[k][:max_prompt_length]
                else:
                    toks[k] = toks[k][-max_prompt_length:] if max_prompt_length > 0 else []
    for toks in (chosen_tokens, rejected_tokens):
        if len(toks["prompt_input_ids"]) + longer > max_length:
            for k in ("input_ids", "attention_mask"):
                toks[k] = toks[k][: max_length - max_prompt_length]

    out: Dict[str, List[int]] = {}
    for name, toks in (("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        n_p = len(toks["prompt_input_ids"])
        ids = toks["prompt_input_ids"] + toks["input_ids"]
        out[f"{name}_input_ids"] = ids
        out[f"{name}_attention_mask"] = toks["prompt_attention_mask"] + toks["attention_mask"]
        out[f"{name}_labels"] = [label_pad_token_id] * n_p + ids[n_p:]
    out["prompt_input_ids"] = prompt_tokens["prompt_input_ids"]
    out["prompt_attention_mask"] = prompt_tokens["prompt_attention_mask"]
    return out
