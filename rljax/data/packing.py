"""Packing SFT text into constant-length blocks (TRL's ConstantLengthDataset).

Part of :mod:`rljax.data` (its docstring has the conventions: NumPy int32 out,
bucketed lengths, deliberate differences from TRL 0.7.11).
"""
from __future__ import annotations

import random
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
)

import numpy as np


def _packing_texts(
    dataset_text_field: Optional[str],
    formatting_func: Optional[Callable[[Any], str]],
) -> Callable[[Any], str]:
    """The per-example text function ConstantLengthDataset uses."""
    if formatting_func is not None:
        if getattr(getattr(formatting_func, "__code__", None), "co_argcount", 1) > 1:
            warnings.warn(
                "The formatting_func passed for packing takes more than one argument; it is called with "
                "one example (a dict) at a time."
            )
        return formatting_func
    if dataset_text_field is not None:
        return lambda ex: ex[dataset_text_field]

    def _identity(ex: Any) -> str:
        if isinstance(ex, str):
            return ex
        raise ValueError(
            "pack_sequences got examples that are not strings: pass `dataset_text_field` or `formatting_func`."
        )

    return _identity


def iter_packed_sequences(
    data: Any,
    tokenizer: Any,
    seq_length: int,
    *,
    dataset_text_field: Optional[str] = None,
    formatting_func: Optional[Callable[[Any], str]] = None,
    num_of_sequences: int = 1024,
    chars_per_token: float = 3.6,
    eos_token_id: Optional[int] = None,
    append_concat_token: bool = True,
    add_special_tokens: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    infinite: bool = False,
) -> Iterator[Dict[str, np.ndarray]]:
    """TRL's ConstantLengthDataset as a generator of ``{"input_ids", "labels"}`` (each ``[seq_length]``).

    Per buffer: collect texts until their total *character* count reaches
    ``seq_length * chars_per_token * num_of_sequences``; tokenize them (no
    truncation); append the concat token after each text; concatenate; cut into
    ``seq_length`` chunks and DROP the partial last chunk (of every buffer, not
    just the last one); shuffle the chunks of the buffer (``random.Random(seed)``,
    one stream for the whole run). Labels equal input ids; no attention mask.

    Concat token quirk kept from TRL: ``tokenizer.eos_token_id if
    tokenizer.eos_token_id else eos_token_id``, so an eos id of 0 counts as
    missing and falls back to the argument; ``eos_token_id=None`` means TRL's
    class default, 0.
    """
    text_of = _packing_texts(dataset_text_field, formatting_func)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    fallback = 0 if eos_token_id is None else int(eos_token_id)
    if tok_eos is None:
        warnings.warn(
            f"The tokenizer has no EOS token; packing uses eos_token_id={fallback} as the separator. "
            "Pass the right `eos_token_id` if that is wrong."
        )
    concat_id = tok_eos if tok_eos else fallback
    max_buffer_chars = seq_length * chars_per_token * num_of_sequences
    rng = random.Random(seed)

    it = iter(data)
    more = True
    while more:
        buffer: List[str] = []
        n_chars = 0
        while n_chars < max_buffer_chars:
            try:
                buffer.append(text_of(next(it)))
            except StopIteration:
                if infinite and len(data) > 0:
                    it = iter(data)
                    warnings.warn("The dataset reached its end; packing restarts from the beginning.")
                    continue
                more = False
                break
            n_chars += len(buffer[-1])
        if not buffer:
            break
        ids = tokenizer(buffer, add_special_tokens=add_special_tokens, truncation=False)["input_ids"]
        stream: List[int] = []
        for x in ids:
            stream.extend(x)
            if append_concat_token:
                stream.append(concat_id)
        chunks = [stream[i : i + seq_length] for i in range(0, len(stream) - seq_length + 1, seq_length)]
        if shuffle:
            rng.shuffle(chunks)
        for chunk in chunks:
            arr = np.asarray(chunk, dtype=np.int32)
            yield {"input_ids": arr, "labels": arr.copy()}


def pack_sequences(data: Any, tokenizer: Any, seq_length: int, **options: Any) -> Dict[str, np.ndarray]:
    """Materialized packing (what SFTTrainer(packing=True) builds): ``input_ids``/``labels`` ``[n, seq_length]``.

    ``data``: a list of strings, or a dataset / list of dicts with
    ``dataset_text_field`` or ``formatting_func(example) -> str``. ``options``: the
    keyword arguments of :func:`iter_packed_sequences` (``dataset_text_field``,
    ``formatting_func``, ``num_of_sequences``, ``chars_per_token``, ``eos_token_id``,
    ``append_concat_token``, ``add_special_tokens``, ``shuffle``, ``seed``), same
    defaults and semantics; one pass, so not ``infinite``.

    Too little text to fill one chunk gives ``[0, seq_length]`` arrays (TRL's
    ConstantLengthDataset is then an empty iterable); SFTTrainer raises on that.
    """
    if options.get("infinite"):
        raise ValueError("pack_sequences materializes one pass over the data; use iter_packed_sequences(infinite=True).")
    rows = list(iter_packed_sequences(data, tokenizer, seq_length, **options))
    ids = np.stack([r["input_ids"] for r in rows]) if rows else np.zeros((0, seq_length), np.int32)
    return {"input_ids": ids, "labels": ids.copy()}


class ConstantLengthDataset:
    """TRL's ``ConstantLengthDataset`` (same constructor): an iterable of packed
    ``{"input_ids", "labels"}`` rows (each ``[seq_length]`` int32), built by
    :func:`iter_packed_sequences`.

    As in TRL, ``len()`` is the length of the underlying text dataset (not the number
    of packed rows), ``infinite`` may be flipped after construction (SFTTrainer sets it
    from ``max_steps``), and every iteration reshuffles each buffer's chunks (here from
    ``seed``, advanced once per ``iter()``, instead of Python's global ``random``).
    ``SFTTrainer(train_dataset=ConstantLengthDataset(...), packing=True)`` uses the rows as
    they are.
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset: Any,
        dataset_text_field: Optional[str] = None,
        formatting_func: Optional[Callable[[Any], str]] = None,
        infinite: bool = False,
        seq_length: int = 1024,
        num_of_sequences: int = 1024,
        chars_per_token: float = 3.6,
        eos_token_id: int = 0,
        shuffle: bool = True,
        append_concat_token: bool = True,
        add_special_tokens: bool = True,
        seed: int = 0,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}.")
        if getattr(tokenizer, "eos_token_id", None) is None:
            warnings.warn(
                f"The tokenizer has no EOS token; packing uses eos_token_id={eos_token_id} as the separator. "
                "Pass the right `eos_token_id` if that is wrong."
            )
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.dataset_text_field = dataset_text_field
        self.formatting_func = formatting_func
        _packing_texts(dataset_text_field, formatting_func)  # warns now for a multi-argument formatting_func
        self.infinite = infinite
        self.seq_length = seq_length
        self.num_of_sequences = num_of_sequences
        self.chars_per_token = chars_per_token
        self.eos_token_id = eos_token_id
        self.concat_token_id = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) else eos_token_id
        self.shuffle = shuffle
        self.append_concat_token = append_concat_token
        self.add_special_tokens = add_special_tokens
        self.seed = seed
        self._iterations = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self.iter_rows(infinite=self.infinite)

    def iter_rows(self, infinite: bool = False) -> Iterator[Dict[str, np.ndarray]]:
        """A fresh pass (``infinite=True``: endless) over the packed rows."""
        seed = self.seed + self._iterations
        self._iterations += 1
        return iter_packed_sequences(
            self.dataset, self.tokenizer, self.seq_length,
            dataset_text_field=self.dataset_text_field, formatting_func=self.formatting_func,
            num_of_sequences=self.num_of_sequences, chars_per_token=self.chars_per_token,
            eos_token_id=self.eos_token_id, append_concat_token=self.append_concat_token,
            add_special_tokens=self.add_special_tokens, shuffle=self.shuffle, seed=seed, infinite=infinite,
        )

    def materialize(self) -> List[Dict[str, np.ndarray]]:
        """Every packed row of one pass over the text (what SFTTrainer trains on)."""
        return list(self.iter_rows(infinite=False))
