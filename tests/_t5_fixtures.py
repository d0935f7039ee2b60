"""Tiny encoder-decoder fixtures for the TRL test ports: a T5-style tokenizer (the session BPE
tokenizer with pad 0 / eos 1 and an eos appended by ``add_special_tokens``, as T5's) and a
tiny random rljax T5 (v1.0 layout, no dropout) sized to a given vocabulary."""
import copy

import jax


def t5_like_tokenizer(tiny_tokenizer):
    """A copy of the session tokenizer whose ``add_special_tokens=True`` appends eos, as T5's does."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    eos = tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_token_id)])
    assert tok("hi")["input_ids"][-1] == tok.eos_token_id and tok("hi", add_special_tokens=False)["input_ids"][-1] != tok.eos_token_id
    return tok


def tiny_t5(vocab_size: int, seed: int = 0):
    """An ``rljax.models.AutoModelForSeq2SeqLM`` T5 (2+2 blocks, 32 wide) with random weights."""
    from rljax.models.auto import AutoModelForSeq2SeqLM
    from rljax.models.t5 import T5Config

    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
    return AutoModelForSeq2SeqLM.from_config(cfg, rng=jax.random.PRNGKey(seed))
