"""Chat and instruction datasets -> text through the tokenizer's chat template (TRL 0.7.11's
``trl.extras.dataset_formatting``), used by SFTTrainer when neither ``dataset_text_field``
nor ``formatting_func`` is given.

Part of :mod:`rljax.data` (its docstring has the conventions).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

_CHAT_KEYS = {"role", "content"}


def _is_string_feature(feature: Any) -> bool:
    return getattr(feature, "dtype", None) == "string"


def _is_chatml_feature(feature: Any) -> bool:
    """A ``datasets`` feature for ``[{"role": str, "content": str}, ...]``."""
    inner = getattr(feature, "feature", None)  # datasets.List / Sequence
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]  # the older list-of-one-dict spelling
    return (
        isinstance(inner, dict) and set(inner) == _CHAT_KEYS and all(_is_string_feature(v) for v in inner.values())
    )


def _is_chatml_value(value: Any) -> bool:
    """A python ``[{"role": str, "content": str}, ...]`` (rows of a list of dicts)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and set(m) == _CHAT_KEYS and all(isinstance(v, str) for v in m.values())
                for m in value)
    )


def _check_chat_template(tokenizer: Any, what: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The dataset is in {what} format, which SFTTrainer formats with the tokenizer's chat template, but "
            "the tokenizer has no `chat_template`. Set `tokenizer.chat_template` (e.g. a ChatML template), or pass "
            "`dataset_text_field` / `formatting_func`."
        )


def conversations_formatting_function(tokenizer: Any, messages_field: str) -> Callable:
    """``format(examples)``: a batch (``{field: [conversation, ...]}``) -> list of texts, or one
    example (``{field: conversation}``) -> one text, via ``tokenizer.apply_chat_template``."""

    def format_dataset(examples: Dict[str, Any]) -> Union[str, List[str]]:
        value = examples[messages_field]
        if len(value) and isinstance(value[0], list):
            return [tokenizer.apply_chat_template(list(conv), tokenize=False) for conv in value]
        return tokenizer.apply_chat_template(list(value), tokenize=False)

    return format_dataset


def instructions_formatting_function(tokenizer: Any) -> Callable:
    """``format(examples)``: ``prompt``/``completion`` as a user/assistant exchange through the
    chat template; a batch gives a list of texts, one example one text."""

    def _one(prompt: str, completion: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    def format_dataset(examples: Dict[str, Any]) -> Union[str, List[str]]:
        if isinstance(examples["prompt"], (list, tuple)):
            return [_one(p, c) for p, c in zip(examples["prompt"], examples["completion"])]
        return _one(examples["prompt"], examples["completion"])

    return format_dataset


def get_formatting_func_from_dataset(dataset: Any, tokenizer: Any) -> Optional[Callable]:
    """The formatting function for a chat (``messages`` / ``conversations`` holding
    ``[{"role", "content"}]``) or instruction (exactly ``prompt`` and ``completion``
    columns) dataset; None for any other layout. The same detection order as TRL 0.7.11
    (the instruction layout is only considered when there is no ``conversations`` column).

    ``dataset``: a ``datasets.Dataset`` (detected from its features) or a list of dicts
    (detected from the first row).

    Raises:
        ValueError: a chat/instruction layout but the tokenizer has no chat template
            (transformers 4.38 fell back to a class default template with a warning;
            recent transformers versions have none).
    """
    features = getattr(dataset, "features", None)
    if features is not None:
        names = set(features)
        is_chat = {c: c in names and _is_chatml_feature(features[c]) for c in ("messages", "conversations")}
        is_instruction = names == {"prompt", "completion"} and all(_is_string_feature(features[c]) for c in names)
    elif isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], dict):
        row = dataset[0]
        names = set(row)
        is_chat = {c: c in names and _is_chatml_value(row[c]) for c in ("messages", "conversations")}
        is_instruction = names == {"prompt", "completion"} and all(isinstance(row[c], str) for c in names)
    else:
        return None
    for field in ("messages", "conversations"):
        if is_chat[field]:
            _check_chat_template(tokenizer, "chat (`" + field + "`)")
            return conversations_formatting_function(tokenizer, field)
    if "conversations" not in names and is_instruction:
        _check_chat_template(tokenizer, "instruction (`prompt`/`completion`)")
        return instructions_formatting_function(tokenizer)
    return None
