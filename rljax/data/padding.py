"""Padding, bucketed lengths, truncation and the pad-token rules shared by every collator.

Part of :mod:`rljax.data` (its docstring has the conventions: NumPy int32 out,
bucketed lengths, deliberate differences from TRL 0.7.11).
"""
from __future__ import annotations

import math
from typing import (
    Any,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import numpy as np

#: Default bucket granularity for collators (tokens). ``None`` in a collator's
#: ``pad_to_multiple_of`` means this value.
DEFAULT_PAD_MULTIPLE = 64


IntSeq = Sequence[int]


Example = Union[IntSeq, Mapping[str, Any]]


def bucket_length(n: int, multiple: int = DEFAULT_PAD_MULTIPLE, max_length: Optional[int] = None) -> int:
    """Static padded length for a batch whose longest sequence has ``n`` tokens.

    Rounds ``n`` up to a multiple of ``multiple`` (at least one multiple, so an
    empty batch still gets a non-empty shape), capped at ``max_length`` when
    ``n <= max_length``. A sequence longer than ``max_length`` is never cut
    here (TRL's collators do not truncate either: ``tokenizer.pad(padding=True)``
    ignores ``max_length``); it gets its own rounded-up length.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = max(1, math.ceil(n / multiple)) * multiple
    if max_length is not None and n <= max_length:
        length = min(length, max_length)
    return int(length)


def pad_sequences(
    seqs: Sequence[Sequence[Any]],
    pad_value: Union[int, float],
    side: str = "right",
    length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
    dtype: Any = np.int32,
) -> np.ndarray:
    """Stack variable-length sequences into one ``[batch, length]`` array.

    ``length`` fixes the width exactly (a longer sequence is a ``ValueError``:
    truncation is the tokenizer's job). Without it the width is the longest
    sequence, rounded up to ``pad_to_multiple_of`` when given. ``side`` is
    ``"right"`` (pad after the tokens) or ``"left"`` (pad before them, as for
    generation prompts).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    seqs = [np.asarray(s, dtype=dtype).reshape(-1) for s in seqs]
    longest = max((len(s) for s in seqs), default=0)
    if length is None:
        length = longest
        if pad_to_multiple_of:
            length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    elif longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than the requested length {length}")
    out = np.full((len(seqs), length), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        if side == "right":
            out[i, : len(s)] = s
        else:
            out[i, length - len(s) :] = s
    return out


def ensure_pad_token(tokenizer: Any, *, set_to_eos: bool = False) -> int:
    """Return ``tokenizer.pad_token_id``; handle a tokenizer without one as TRL does.

    TRL 0.7.11 per trainer:
      * ``SFTTrainer`` silently sets ``pad_token = eos_token`` when it loads the
        tokenizer itself: call with ``set_to_eos=True`` there.
      * DPO's collator, the reward collator and the LM / completion-only
        collators (via ``tokenizer.pad``) raise: the default here.

    Raises:
        ValueError: no pad token (and ``set_to_eos`` is False or there is no eos).
    """
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if set_to_eos and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return int(tokenizer.pad_token_id)
    raise _no_pad_token_error()


#: The message transformers' collators raise (``tokenizer.pad``) when padding is needed and
#: the tokenizer has no pad token; rljax's collators raise it at the same point, collation.
NO_PAD_TOKEN_MESSAGE = (
    "Asking to pad but the tokenizer does not have a padding token. Please select a token to use as "
    "`pad_token` `(tokenizer.pad_token = tokenizer.eos_token e.g.)` or add a new pad token via "
    "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`."
)


def _no_pad_token_error() -> ValueError:
    return ValueError(NO_PAD_TOKEN_MESSAGE)


def check_padding_side(padding_side: Any) -> str:
    """``tokenizer.padding_side`` validated: ``"right"`` or ``"left"`` (None means right)."""
    side = "right" if padding_side is None else padding_side
    if side not in ("right", "left"):
        raise ValueError(f"tokenizer.padding_side must be 'right' or 'left', got {padding_side!r}.")
    return side


def truncate_sequences(seqs: Sequence[Sequence[Any]], max_length: int, truncation_mode: str = "keep_end") -> List[list]:
    """Cut each sequence to at most ``max_length`` tokens along its *sequence* axis.

    ``keep_start`` keeps the first tokens, ``keep_end`` the last. (TRL 0.7.11's
    IterativeSFTTrainer slices the batch axis instead; we fix that.)
    """
    if truncation_mode == "keep_start":
        return [list(s)[:max_length] for s in seqs]
    if truncation_mode == "keep_end":
        return [list(s)[-max_length:] if max_length > 0 else [] for s in seqs]
    raise ValueError(f"Unknown truncation mode: {truncation_mode!r} (use 'keep_start' or 'keep_end')")


def _multiple(pad_to_multiple_of: Optional[int]) -> int:
    return DEFAULT_PAD_MULTIPLE if pad_to_multiple_of is None else int(pad_to_multiple_of)
