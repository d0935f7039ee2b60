"""Collators: language modelling, completion-only LM, reward pairs and DPO pairs.

Part of :mod:`rljax.data` (its docstring has the conventions: NumPy int32 out,
bucketed lengths, deliberate differences from TRL 0.7.11).
"""
from __future__ import annotations

import warnings
from typing import (
    Any,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import numpy as np

from rljax.data.padding import (
    Example,
    _multiple,
    _no_pad_token_error,
    bucket_length,
    check_padding_side,
    pad_sequences,
)


def _ids_of(example: Example) -> List[int]:
    if isinstance(example, Mapping):
        return list(np.asarray(example["input_ids"]).reshape(-1).tolist())
    return list(np.asarray(example).reshape(-1).tolist())


def collate_lm(
    examples: Sequence[Example],
    pad_token_id: Optional[int],
    *,
    max_length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
    label_pad_token_id: int = -100,
    keep_labels: bool = False,
    padding_side: str = "right",
) -> Dict[str, np.ndarray]:
    """DataCollatorForLanguageModeling(mlm=False): pad and build labels.

    ``examples``: token-id lists or dicts with ``input_ids`` (and optionally
    ``attention_mask``, ``labels``). Output arrays are ``[batch, L]`` int32 with
    ``L = bucket_length(longest, pad_to_multiple_of, max_length)``, padded on
    ``padding_side`` (``"right"`` or ``"left"``, as ``tokenizer.padding_side``):

    * ``input_ids``: padded with ``pad_token_id``;
    * ``attention_mask``: the example's mask (or ones), padded with 0;
    * ``labels``: ``input_ids`` with every ``pad_token_id`` set to
      ``label_pad_token_id`` (as HF does: if pad == eos, real eos tokens are
      masked too), and every added position ``label_pad_token_id``. With
      ``keep_labels=True`` the examples' own ``labels`` are used instead (padded
      with ``label_pad_token_id``), which IterativeSFT needs for ``texts_labels``.

    A pad token is needed only when the examples differ in length (as HF's
    collators); equal-length rows widened to the bucket get filler id 0 at
    positions that are masked out and labelled ``label_pad_token_id``.

    Raises:
        ValueError: examples of different lengths and ``pad_token_id`` is None
            (HF's "Asking to pad but the tokenizer does not have a padding token" message).
    """
    side = check_padding_side(padding_side)
    ids = [_ids_of(ex) for ex in examples]
    lengths = {len(x) for x in ids}
    if pad_token_id is None and len(lengths) > 1:
        raise _no_pad_token_error()
    fill = 0 if pad_token_id is None else int(pad_token_id)
    length = bucket_length(max(lengths, default=0), _multiple(pad_to_multiple_of), max_length)
    input_ids = pad_sequences(ids, fill, side, length)
    real = pad_sequences([np.ones(len(x), np.int32) for x in ids], 0, side, length).astype(bool)
    if examples and isinstance(examples[0], Mapping) and "attention_mask" in examples[0]:
        masks = [np.asarray(ex["attention_mask"]).reshape(-1) for ex in examples]
        attention_mask = pad_sequences(masks, 0, side, length)
    else:
        attention_mask = real.astype(np.int32)
    if keep_labels:
        own = [np.asarray(ex["labels"]).reshape(-1) for ex in examples]
        labels = pad_sequences(own, label_pad_token_id, side, length)
    else:
        keep = real if pad_token_id is None else real & (input_ids != pad_token_id)
        labels = np.where(keep, input_ids, label_pad_token_id).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DataCollatorForLanguageModeling:
    """transformers' ``DataCollatorForLanguageModeling(tokenizer, mlm=False)`` returning NumPy.

    Pads on ``tokenizer.padding_side`` to a bucketed width (``pad_to_multiple_of``,
    default :data:`~rljax.data.padding.DEFAULT_PAD_MULTIPLE`, capped at ``max_length``)
    and builds labels as :func:`collate_lm`. The tokenizer's pad token is read at
    collation, and needed only when the examples differ in length (as HF).
    """

    def __init__(
        self,
        tokenizer: Any,
        mlm: bool = False,
        *,
        pad_to_multiple_of: Optional[int] = None,
        max_length: Optional[int] = None,
        return_tensors: str = "np",
    ):
        if mlm:
            raise ValueError("mlm=True (masked language modelling) is not supported: rljax trains causal LMs; pass mlm=False.")
        if return_tensors != "np":
            raise ValueError(f"rljax collators return NumPy arrays; got return_tensors={return_tensors!r}, use 'np'.")
        self.tokenizer = tokenizer
        self.mlm = False
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> Dict[str, np.ndarray]:
        return collate_lm(
            examples, getattr(self.tokenizer, "pad_token_id", None), max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side=getattr(self.tokenizer, "padding_side", "right"),
        )

    # transformers' collators dispatch on the framework; these are the same NumPy call.
    numpy_call = __call__
    torch_call = __call__


def _find_template(row: np.ndarray, template: Sequence[int]) -> List[int]:
    """Start indices where ``template`` occurs in ``row`` (TRL scans positions equal to template[0])."""
    t = list(template)
    starts = []
    for idx in np.flatnonzero(row == t[0]):
        if row[idx : idx + len(t)].tolist() == t:
            starts.append(int(idx))
    return starts


class DataCollatorForCompletionOnlyLM(DataCollatorForLanguageModeling):
    """Mask everything but the completions out of the LM labels (TRL 0.7.11 semantics).

    ``DataCollatorForCompletionOnlyLM(response_template, instruction_template=None,
    tokenizer, mlm=False, ignore_index=-100, pad_to_multiple_of=None)``; the tokenizer
    may be the third positional argument or a keyword, as in TRL.

    Templates are strings (encoded with ``add_special_tokens=False``) or token
    id lists (use ids when the tokenizer encodes the template differently in
    context). Matching is done on the labels (pads already ``-100``).

    * Single-turn (no ``instruction_template``): labels up to the end of the
      LAST occurrence of the response template are ``ignore_index``.
    * Multi-turn: each human turn ``[instruction start, end of the following
      response template)`` is ignored (the first from position 0); a trailing
      human turn without a response is ignored to the end.
    * A template not found: a warning naming it (TRL's wording), and the whole
      row is ``ignore_index``.

    ``__call__(examples) -> {"input_ids", "attention_mask", "labels"}``, each
    ``[batch, L]`` int32, padded as :class:`DataCollatorForLanguageModeling`
    (``tokenizer.padding_side``; a pad token only when rows differ in length).
    ``torch_call`` / ``numpy_call`` are the same call (TRL's tests call ``torch_call``).
    """

    def __init__(
        self,
        response_template: Union[str, Sequence[int]],
        instruction_template: Optional[Union[str, Sequence[int]]] = None,
        tokenizer: Any = None,
        *,
        mlm: bool = False,
        ignore_index: int = -100,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        return_tensors: str = "np",
    ):
        if tokenizer is None:
            raise ValueError("DataCollatorForCompletionOnlyLM needs tokenizer=... (it encodes the templates and pads).")
        super().__init__(tokenizer, mlm, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length,
                         return_tensors=return_tensors)
        self.response_template = response_template
        self.instruction_template = instruction_template
        self.response_token_ids = self._encode(response_template)
        self.instruction_token_ids = None if instruction_template is None else self._encode(instruction_template)
        if not self.response_token_ids:
            raise ValueError(f"response_template {response_template!r} encodes to no tokens")
        if self.instruction_token_ids is not None and not self.instruction_token_ids:
            raise ValueError(f"instruction_template {instruction_template!r} encodes to no tokens")
        self.ignore_index = ignore_index
        if instruction_template and tokenizer.pad_token_id == tokenizer.eos_token_id:
            warnings.warn(
                "The pad_token_id and eos_token_id values of this tokenizer are identical. If you are planning for "
                "multi-turn training, it can result in the model continuously generating questions and answers "
                "without eos token. To avoid this, set the pad_token_id to a different value."
            )

    def _encode(self, template: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(template, str):
            return list(self.tokenizer.encode(template, add_special_tokens=False))
        return [int(t) for t in template]

    def _not_found(self, kind: str, template: Any, ids: np.ndarray, mask: np.ndarray) -> None:
        text = self.tokenizer.decode(ids[mask.astype(bool)].tolist())
        warnings.warn(
            f"Could not find {kind} key `{template}` in the following instance: {text} "
            f"This instance will be ignored in loss calculation (labels = {self.ignore_index}). "
            "Note, if this happens often, consider increasing the `max_seq_length`."
        )

    def __call__(self, examples: Sequence[Example]) -> Dict[str, np.ndarray]:
        batch = super().__call__(examples)
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

    numpy_call = __call__
    torch_call = __call__


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
        side = check_padding_side(getattr(self.tokenizer, "padding_side", "right"))
        lengths = {len(f[k]) for f in features for k in ("input_ids_chosen", "input_ids_rejected")}
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:  # needed only when rows differ in length; else filler under mask 0
            if len(lengths) > 1:
                raise _no_pad_token_error()
            pad_id = 0
        longest = max(lengths, default=0)
        length = bucket_length(longest, _multiple(self.pad_to_multiple_of), self.max_length)
        batch = {}
        for k in _REWARD_KEYS:
            pad = pad_id if k.startswith("input_ids") else 0
            batch[k] = pad_sequences([f[k] for f in features], pad, side, length)
        if features and "margin" in features[0]:
            batch["margin"] = np.asarray([f["margin"] for f in features], dtype=np.float32)
        return batch


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
