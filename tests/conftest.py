"""Test setup: 8 simulated CPU devices (for sharding tests) and shared tiny fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache: tests build the same tiny models again and again, and
# compiling dominates the suite on 2 CPU cores. Set through the environment so the test
# subprocesses (examples, fault injection) share it. Kept in the checkout (.gitignored).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

CORPUS = [
    "the movie was great and the acting was wonderful",
    "the film was terrible and the plot was boring",
    "i loved this movie , a great story",
    "i hated this film , a boring mess",
    "what a wonderful and happy experience",
    "what an awful and sad experience",
    "Question: what is two plus two ? Answer: four",
    "### Human: hello there ### Assistant: hi , how can i help ?",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small BPE tokenizer trained offline (pad, eos, bos, unk special tokens)."""
    from rljax.data import train_tokenizer

    return train_tokenizer(CORPUS * 4, vocab_size=128)
