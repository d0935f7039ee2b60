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

Deliberate differences from TRL 0.7.11 (also listed in the README):

* :func:`dpo_tokenize_row` prepends BOS only when the tokenizer has one and the
  prompt does not already start with it (TRL prepends ``bos_token_id``
  unconditionally, giving ``None`` ids or a double BOS: TRL issues #907/#1073).
* :func:`truncate_sequences` truncates the *sequence* axis (IterativeSFT's
  ``max_length`` in TRL slices the batch axis).
* Missing text columns / misconfigured SFT inputs raise ``ValueError`` with the
  fix instead of a ``KeyError`` deep inside ``datasets.map``.

The package is split by concern: :mod:`~rljax.data.padding`, :mod:`~rljax.data.tokenize`,
:mod:`~rljax.data.packing`, :mod:`~rljax.data.collators`, :mod:`~rljax.data.batching`,
:mod:`~rljax.data.formatting` (chat / instruction datasets through the chat template);
every public name is re-exported here.
"""
from rljax.data.batching import (  # noqa: F401
    BatchIterator,
)
from rljax.data.collators import (  # noqa: F401
    _REWARD_KEYS,
    DataCollatorForCompletionOnlyLM,
    DataCollatorForLanguageModeling,
    DPODataCollatorWithPadding,
    RewardDataCollatorWithPadding,
    _find_template,
    _ids_of,
    collate_lm,
    concatenated_inputs,
)
from rljax.data.formatting import (  # noqa: F401
    conversations_formatting_function,
    get_formatting_func_from_dataset,
    instructions_formatting_function,
)
from rljax.data.packing import (  # noqa: F401
    ConstantLengthDataset,
    _packing_texts,
    iter_packed_sequences,
    pack_sequences,
)
from rljax.data.padding import (  # noqa: F401
    DEFAULT_PAD_MULTIPLE,
    NO_PAD_TOKEN_MESSAGE,
    Example,
    IntSeq,
    _multiple,
    _no_pad_token_error,
    bucket_length,
    check_padding_side,
    ensure_pad_token,
    pad_sequences,
    truncate_sequences,
)
from rljax.data.tokenize import (  # noqa: F401
    _build_tokenized_answer,
    _column_batches,
    _column_names,
    dpo_tokenize_row,
    tokenize_preference_dataset,
    tokenize_sft_dataset,
    train_tokenizer,
)
