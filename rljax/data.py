"""Tokenization, padding, packing and collators (TRL 0.7.11 data semantics)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from transformers import PreTrainedTokenizerFast


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
