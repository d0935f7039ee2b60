"""Tokenization, padding, packing and collators (TRL 0.7.11 data semantics).

Everything here runs on the host and returns NumPy ``int32`` arrays (``float32``
for margins and cached log-probs). Collators pad to *bucketed* lengths
(:func:`bucket_length`) so that a jitted train step sees only a handful of
distinct shapes instead of recompiling for every batch.

Where TRL 0.7.11 pads to the longest example of the batch, we pad to the next
multiple of ``pad_to_multiple_of`` (default :data:`DEFAULT_PAD_MULTIPLE`),
capped at ``max_length``. The extra positions are padding (mask 0, label
-100), so losses and metrics are unchanged. Pass ``pad_to_multiple_of=1`` to
get TRL's exact dynamic shapes back.

Deliberate differences from TRL 0.7.11 (see ``DESIGN.md``, "Our decisions"):

* :func:`dpo_tokenize_row` prepends BOS only when the tokenizer has one and the
  prompt does not already start with it (TRL prepends ``bos_token_id``
  unconditionally, giving ``None`` ids or a double BOS: TRL issues #907/#1073).
* :func:`truncate_sequences` truncates the *sequence* axis (IterativeSFT's
  ``max_length`` in TRL slices the batch axis).
* Missing text columns / misconfigured SFT inputs raise ``ValueError`` with the
  fix instead of a ``KeyError`` deep inside ``datasets.map``.
"""
from __future__ import annotations

import math
import random
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
    Union,
)

import numpy as np
from transformers import PreTrainedTokenizerFast

#: Default bucket granularity for collators (tokens). ``None`` in a collator's
#: ``pad_to_multiple_of`` means this value.
DEFAULT_PAD_MULTIPLE = 64

IntSeq = Sequence[int]
Example = Union[IntSeq, Mapping[str, Any]]


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
    kwargs = dict(pad_token=pad_token, eos_token=eos_token, unk_token=unk_token)
    if bos_token:
        kwargs["bos_token"] = bos_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# ---------------------------------------------------------------------------
# Padding and bucketing
# ---------------------------------------------------------------------------


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


def _no_pad_token_error() -> ValueError:
    return ValueError(
        "The tokenizer has no padding token, which batching needs. Set one before "
        "building batches, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
    )


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


# ---------------------------------------------------------------------------
# SFT: tokenization and packing
# ---------------------------------------------------------------------------


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
):
    """SFTTrainer's non-packed preprocessing: tokenize, truncate to ``max_seq_length``, no padding.

    ``dataset`` is a ``datasets.Dataset`` or a list of dicts. The text comes from
    ``dataset[dataset_text_field]`` or from ``formatting_func(batch)`` where
    ``batch`` maps column -> list of values (``dataset_batch_size`` rows) and
    must return a list of strings. As in TRL the field wins when both are given.

    Returns a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``
    (ragged lists of ints), plus the original columns if
    ``remove_unused_columns`` is False.

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

    out: Dict[str, list] = {"input_ids": [], "attention_mask": []}
    kept = [c for c in columns if c not in ("input_ids", "attention_mask")] if not remove_unused_columns else []
    for c in kept:
        out[c] = []
    checked = False
    for batch in _column_batches(dataset, dataset_batch_size):
        if use_func:
            texts = formatting_func(batch)
            if not checked and not isinstance(texts, list):
                raise ValueError(
                    "The `formatting_func` should return a list of processed strings "
                    f"(got {type(texts).__name__}), since anything else can lead to silent bugs."
                )
            checked = True
        else:
            texts = batch[dataset_text_field]
        enc = tokenizer(
            texts,
            add_special_tokens=add_special_tokens,
            truncation=True,
            padding=False,
            max_length=max_seq_length,
        )
        out["input_ids"].extend(enc["input_ids"])
        out["attention_mask"].extend(enc["attention_mask"])
        for c in kept:
            out[c].extend(batch[c])
    return Dataset.from_dict(out)


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


def pack_sequences(
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
) -> Dict[str, np.ndarray]:
    """Materialized packing (what SFTTrainer(packing=True) builds): ``input_ids``/``labels`` ``[n, seq_length]``.

    ``data``: a list of strings, or a dataset / list of dicts with
    ``dataset_text_field`` or ``formatting_func(example) -> str``. Semantics:
    :func:`iter_packed_sequences`.

    Raises:
        ValueError: the data is too short to fill a single chunk (as TRL's SFTTrainer).
    """
    rows = list(
        iter_packed_sequences(
            data,
            tokenizer,
            seq_length,
            dataset_text_field=dataset_text_field,
            formatting_func=formatting_func,
            num_of_sequences=num_of_sequences,
            chars_per_token=chars_per_token,
            eos_token_id=eos_token_id,
            append_concat_token=append_concat_token,
            add_special_tokens=add_special_tokens,
            shuffle=shuffle,
            seed=seed,
        )
    )
    if not rows:
        raise ValueError(
            f"Packing produced no sequence of {seq_length} tokens: the dataset needs enough text "
            "to fill at least one packed sequence (or use a smaller seq_length)."
        )
    ids = np.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.copy()}


# ---------------------------------------------------------------------------
# Language-modelling collators
# ---------------------------------------------------------------------------


def _ids_of(example: Example) -> List[int]:
    if isinstance(example, Mapping):
        return list(np.asarray(example["input_ids"]).reshape(-1).tolist())
    return list(np.asarray(example).reshape(-1).tolist())


def collate_lm(
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    max_length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
    label_pad_token_id: int = -100,
    keep_labels: bool = False,
) -> Dict[str, np.ndarray]:
    """DataCollatorForLanguageModeling(mlm=False): right-pad and build labels.

    ``examples``: token-id lists or dicts with ``input_ids`` (and optionally
    ``attention_mask``, ``labels``). Output arrays are ``[batch, L]`` int32 with
    ``L = bucket_length(longest, pad_to_multiple_of, max_length)``:

    * ``input_ids``: padded with ``pad_token_id``;
    * ``attention_mask``: the example's mask (or ones), padded with 0;
    * ``labels``: ``input_ids`` with every ``pad_token_id`` set to
      ``label_pad_token_id`` (as HF does: if pad == eos, real eos tokens are
      masked too). With ``keep_labels=True`` the examples' own ``labels`` are
      used instead (padded with ``label_pad_token_id``), which IterativeSFT
      needs for ``texts_labels``.
    """
    if pad_token_id is None:
        raise _no_pad_token_error()
    ids = [_ids_of(ex) for ex in examples]
    length = bucket_length(max((len(x) for x in ids), default=0), _multiple(pad_to_multiple_of), max_length)
    input_ids = pad_sequences(ids, pad_token_id, "right", length)
    if examples and isinstance(examples[0], Mapping) and "attention_mask" in examples[0]:
        masks = [np.asarray(ex["attention_mask"]).reshape(-1) for ex in examples]
    else:
        masks = [np.ones(len(x), np.int32) for x in ids]
    attention_mask = pad_sequences(masks, 0, "right", length)
    if keep_labels:
        own = [np.asarray(ex["labels"]).reshape(-1) for ex in examples]
        labels = pad_sequences(own, label_pad_token_id, "right", length)
    else:
        labels = np.where(input_ids == pad_token_id, label_pad_token_id, input_ids).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _find_template(row: np.ndarray, template: Sequence[int]) -> List[int]:
    """Start indices where ``template`` occurs in ``row`` (TRL scans positions equal to template[0])."""
    t = list(template)
    starts = []
    for idx in np.flatnonzero(row == t[0]):
        if row[idx : idx + len(t)].tolist() == t:
            starts.append(int(idx))
    return starts


class DataCollatorForCompletionOnlyLM:
    """Mask everything but the completions out of the LM labels (TRL 0.7.11 semantics).

    Templates are strings (encoded with ``add_special_tokens=False``) or token
    id lists (use ids when the tokenizer encodes the template differently in
    context). Matching is done on the labels (pads already -100).

    * Single-turn (no ``instruction_template``): labels up to the end of the
      LAST occurrence of the response template are ``ignore_index``.
    * Multi-turn: each human turn ``[instruction start, end of the following
      response template)`` is ignored (the first from position 0); a trailing
      human turn without a response is ignored to the end.
    * A template not found: ``warnings.warn`` naming it, and the whole row is
      ``ignore_index``.

    ``__call__(examples) -> {"input_ids", "attention_mask", "labels"}``, each
    ``[batch, L]`` int32, padded as :func:`collate_lm`.
    """

    def __init__(
        self,
        response_template: Union[str, Sequence[int]],
        instruction_template: Optional[Union[str, Sequence[int]]] = None,
        *,
        tokenizer: Any,
        ignore_index: int = -100,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        mlm: bool = False,
    ):
        if mlm:
            raise ValueError("mlm=True is not supported (TRL's collator ignores it as well; causal LMs only).")
        self.tokenizer = tokenizer
        self.response_template = response_template
        self.instruction_template = instruction_template
        self.response_token_ids = self._encode(response_template)
        self.instruction_token_ids = None if instruction_template is None else self._encode(instruction_template)
        if not self.response_token_ids:
            raise ValueError(f"response_template {response_template!r} encodes to no tokens")
        if self.instruction_token_ids is not None and not self.instruction_token_ids:
            raise ValueError(f"instruction_template {instruction_template!r} encodes to no tokens")
        self.ignore_index = ignore_index
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        if instruction_template is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
            warnings.warn(
                "pad_token_id equals eos_token_id: in multi-turn training the eos labels are masked as padding, "
                "so the model may never learn to stop. Use a pad token different from eos."
            )

    def _encode(self, template: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(template, str):
            return list(self.tokenizer.encode(template, add_special_tokens=False))
        return [int(t) for t in template]

    def _not_found(self, kind: str, template: Any, ids: np.ndarray, mask: np.ndarray) -> None:
        text = self.tokenizer.decode(ids[mask.astype(bool)].tolist())
        warnings.warn(
            f"Could not find {kind} template {template!r} in the example {text!r}. The whole example is "
            f"ignored in the loss (labels = {self.ignore_index}). If this happens often, increase max_seq_length."
        )

    def __call__(self, examples: Sequence[Example]) -> Dict[str, np.ndarray]:
        pad_id = ensure_pad_token(self.tokenizer)
        batch = collate_lm(
            examples, pad_id, max_length=self.max_length, pad_to_multiple_of=self.pad_to_multiple_of
        )
        labels = batch["labels"]
        for i in range(labels.shape[0]):
            ids_i, mask_i = batch["input_ids"][i], batch["attention_mask"][i]
            resp_starts = _find_template(labels[i], self.response_token_ids)
            if self.instruction_token_ids is None:
                if not resp_starts:
                    self._not_found("response", self.response_template, ids_i, mask_i)
                    labels[i, :] = self.ignore_index
                else:
                    labels[i, : resp_starts[-1] + len(self.response_token_ids)] = self.ignore_index
                continue

            resp_ends = [s + len(self.response_token_ids) for s in resp_starts]
            if not resp_ends:
                self._not_found("response", self.response_template, ids_i, mask_i)
                labels[i, :] = self.ignore_index
            # searched after a missing response blanked the row, as in TRL (then both warn)
            human_starts = _find_template(labels[i], self.instruction_token_ids)
            if not human_starts:
                self._not_found("instruction", self.instruction_template, ids_i, mask_i)
                labels[i, :] = self.ignore_index
            if human_starts and resp_ends and human_starts[0] > resp_ends[0]:
                human_starts = [0] + human_starts
            for k, (start, end) in enumerate(zip(human_starts, resp_ends)):
                labels[i, (0 if k == 0 else start) : end] = self.ignore_index
            if len(resp_ends) < len(human_starts):
                labels[i, human_starts[-1] :] = self.ignore_index
        batch["labels"] = labels
        return batch


# ---------------------------------------------------------------------------
# Reward modelling
# ---------------------------------------------------------------------------

_REWARD_KEYS = ("input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected")


class RewardDataCollatorWithPadding:
    """Pad preference pairs for the reward model (TRL's RewardDataCollatorWithPadding).

    ``__call__(features)`` with features holding the four ``_REWARD_KEYS`` (and
    optionally ``margin``, read when the first feature has it) returns
    ``input_ids_chosen``, ``attention_mask_chosen``, ``input_ids_rejected``,
    ``attention_mask_rejected`` (``[batch, L]`` int32) and ``margin``
    (``[batch]`` float32). Padding side follows ``tokenizer.padding_side`` as in
    TRL. Unlike TRL, chosen and rejected share one bucketed length ``L`` (a
    single compiled shape; the values are unchanged), and ``return_loss`` is not
    emitted (not an array).
    """

    def __init__(self, tokenizer: Any, max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        for f in features:
            missing = [k for k in _REWARD_KEYS if k not in f]
            if missing:
                raise ValueError(
                    f"Reward features must include {', '.join(_REWARD_KEYS)}; missing: {', '.join(missing)}"
                )
        pad_id = ensure_pad_token(self.tokenizer)
        side = getattr(self.tokenizer, "padding_side", "right")
        longest = max((len(f[k]) for f in features for k in ("input_ids_chosen", "input_ids_rejected")), default=0)
        length = bucket_length(longest, _multiple(self.pad_to_multiple_of), self.max_length)
        batch = {}
        for k in _REWARD_KEYS:
            pad = pad_id if k.startswith("input_ids") else 0
            batch[k] = pad_sequences([f[k] for f in features], pad, side, length)
        if features and "margin" in features[0]:
            batch["margin"] = np.asarray([f["margin"] for f in features], dtype=np.float32)
        return batch


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


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------


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


class DPODataCollatorWithPadding:
    """TRL's DPODataCollatorWithPadding (decoder-only), with bucketed static lengths.

    For every key ending in ``_input_ids`` (pad ``pad_token_id``),
    ``_attention_mask`` (pad 0) or ``_labels`` (pad ``label_pad_token_id``):
    a ``[batch, L]`` int32 array, right-padded, except keys containing
    ``prompt`` which are LEFT-padded. ``L`` is bucketed per key. Keys ending in
    ``_logps`` become float32 ``[batch]`` arrays; any other key is returned as
    a list.
    """

    def __init__(
        self,
        pad_token_id: Optional[int] = 0,
        label_pad_token_id: int = -100,
        *,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
    ):
        self.pad_token_id = pad_token_id
        self.label_pad_token_id = label_pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        batch: Dict[str, Any] = {}
        for k in features[0].keys():
            values = [f[k] for f in features]
            if k.endswith(("_input_ids", "_attention_mask", "_labels")):
                if k.endswith("_input_ids"):
                    if self.pad_token_id is None:
                        raise _no_pad_token_error()
                    pad = self.pad_token_id
                elif k.endswith("_labels"):
                    pad = self.label_pad_token_id
                else:
                    pad = 0
                length = bucket_length(
                    max((len(v) for v in values), default=0), _multiple(self.pad_to_multiple_of), self.max_length
                )
                batch[k] = pad_sequences(values, pad, "left" if "prompt" in k else "right", length)
            elif k.endswith("_logps"):
                batch[k] = np.asarray(values, dtype=np.float32)
            else:
                batch[k] = values
        return batch


def concatenated_inputs(
    batch: Mapping[str, Any], padding_value: int = 0, label_pad_token_id: int = -100
) -> Dict[str, np.ndarray]:
    """Stack chosen then rejected along the batch axis: ``concatenated_*`` ``[2B, L]``.

    ``L = max(chosen width, rejected width)``; shorter sides are right-padded
    (``_labels`` with ``label_pad_token_id``, ``_input_ids`` with
    ``padding_value``, ``_attention_mask`` with 0). Decoder-only (TRL's
    ``DPOTrainer.concatenated_inputs``).
    """
    length = max(np.shape(batch["chosen_input_ids"])[1], np.shape(batch["rejected_input_ids"])[1])

    def _pad(x: np.ndarray, key: str) -> np.ndarray:
        if "labels" in key:
            pad = label_pad_token_id
        elif key.endswith("_input_ids"):
            pad = padding_value
        else:
            pad = 0
        x = np.asarray(x)
        return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=pad)

    out = {}
    for k, v in batch.items():
        if k.startswith("chosen") and k.endswith(("_input_ids", "_attention_mask", "_labels")) and np.ndim(v) == 2:
            rk = "rejected" + k[len("chosen") :]
            out["concatenated" + k[len("chosen") :]] = np.concatenate([_pad(v, k), _pad(batch[rk], rk)], axis=0)
    return out


# ---------------------------------------------------------------------------
# Batch iteration
# ---------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, resumable minibatches over a ``datasets.Dataset`` or a list.

    Epoch ``e`` visits the examples in ``np.random.default_rng([seed, e])``
    order (or in order when ``shuffle=False``), so the batch at any
    ``position`` is a pure function of ``(seed, position)``. ``position``
    counts batches handed out since the start of training (across epochs):
    save it, and pass it back as ``position=`` to resume exactly.

    Each batch is ``collate_fn(list_of_examples)``, or the list itself.
    With ``drop_last=False`` the last batch of an epoch may be smaller (one
    more compiled shape). Iteration stops after ``num_epochs`` (None: never).
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_epochs: Optional[int] = None,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        position: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.n = len(data)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.collate_fn = collate_fn
        self.position = int(position)
        full, rest = divmod(self.n, batch_size)
        self.batches_per_epoch = full if (drop_last or rest == 0) else full + 1
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.n} examples give no batch of size {batch_size} with drop_last={drop_last}")
        self._order_cache: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.position // self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices ``[n]`` for ``epoch``."""
        if epoch not in self._order_cache:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            )
            self._order_cache = {epoch: order}
        return self._order_cache[epoch]

    def indices(self, position: int) -> np.ndarray:
        """Example indices of the batch at global ``position``."""
        epoch, b = divmod(position, self.batches_per_epoch)
        return self.epoch_order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Any:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        examples = [self.data[int(i)] for i in self.indices(self.position)]
        self.position += 1
        return self.collate_fn(examples) if self.collate_fn is not None else examples
