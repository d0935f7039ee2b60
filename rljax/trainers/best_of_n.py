"""TRL 0.7.11's ``BestOfNSampler`` (``trl.extras.best_of_n_sampler``): sample ``sample_size``
continuations per query, score them, keep the ``n_candidates`` best.

Unlike TRL (one ``generate`` call per query), every query's samples are drawn in ONE jitted
generation call: the queries are repeated ``sample_size`` times, left-padded to a bucketed
length and decoded together. TRL draws ``length_sampler()`` once per query; so does this
shell (one draw per query, in order), generating up to the largest draw and cutting each
query's samples at its own. The scorer is either TRL's Python callable on the decoded texts
(``queries_to_scores(list[str]) -> list[float]``) or, with ``score_tokens=True``, a JAX
function on tokens (``queries_to_scores(sequences [B, L] int32, mask [B, L] int32) -> [B]``,
jit it yourself) whose top-k runs on device; only the winners are decoded then.

Deliberate differences: ``seed=None`` means seed 0 (rljax draws every sample from an explicit
key; pass ``rng=`` to ``generate`` for other draws); ``device`` is accepted and ignored (JAX
places arrays itself).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rljax.data.padding import bucket_length, pad_sequences

_PAD_MULTIPLE = 8


def _query_list(tokenized_query: Any) -> List[np.ndarray]:
    """TRL's accepted inputs -> a list of 1-D int32 arrays: one query (a list of ints, a 1-D
    array/tensor) or a batch (a list of those, or a 2-D array of equal-length rows)."""
    def arr(x):
        if hasattr(x, "detach"):  # torch
            x = x.detach().cpu().numpy()
        return np.asarray(x)

    if isinstance(tokenized_query, (list, tuple)):
        if len(tokenized_query) == 0:
            raise ValueError("tokenized_query is empty; pass token ids of at least one query.")
        first = tokenized_query[0]
        if isinstance(first, (int, np.integer)):
            queries = [arr(tokenized_query)]
        else:
            queries = [arr(q).reshape(-1) for q in tokenized_query]
    else:
        a = arr(tokenized_query)
        queries = [a] if a.ndim == 1 else list(a) if a.ndim == 2 else None
        if queries is None:
            raise ValueError(f"tokenized_query must be 1-D (one query) or 2-D (a batch), got shape {a.shape}.")
    for i, q in enumerate(queries):
        if q.ndim != 1 or q.size == 0 or not np.issubdtype(q.dtype, np.integer):
            raise ValueError(f"query {i} must be a non-empty 1-D sequence of integer token ids, got {q.dtype} {q.shape}.")
    return [q.astype(np.int32) for q in queries]


class BestOfNSampler:
    """Best-of-n sampling with TRL's constructor.

    model: an rljax causal-LM shell (``AutoModelForCausalLM`` / ``...WithValueHead``) or a
        ``(module, params)`` pair (wrapped in an ``AutoModelForCausalLM``).
    tokenizer: an HF tokenizer. queries_to_scores: see the module docstring. length_sampler:
        ``() -> int`` new-token count (e.g. ``LengthSampler(2, 6)``), or None to take
        ``max_new_tokens`` from the generation settings. sample_size: samples per query.
        seed: the key stream's seed. n_candidates: texts returned per query (best first).
        generation_config: an rljax/transformers ``GenerationConfig`` (HF's generate settings).
        score_tokens: ``queries_to_scores`` takes token arrays (a JAX function), not texts.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        queries_to_scores: Callable[..., Any],
        length_sampler: Optional[Callable[[], int]],
        sample_size: int = 4,
        seed: Optional[int] = None,
        n_candidates: int = 1,
        generation_config: Any = None,
        *,
        score_tokens: bool = False,
    ) -> None:
        from transformers import PreTrainedTokenizerBase

        from rljax.models.auto import AutoModelForCausalLM

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer must be a PreTrainedTokenizer or PreTrainedTokenizerFast, got {type(tokenizer)}")
        if isinstance(model, tuple) and len(model) == 2:
            model = AutoModelForCausalLM(*model)
        if not isinstance(model, AutoModelForCausalLM):
            raise ValueError(
                f"model must be an rljax AutoModelForCausalLM / AutoModelForCausalLMWithValueHead or a (module, params) "
                f"pair, got {type(model)}"
            )
        if not callable(queries_to_scores):
            raise ValueError("queries_to_scores must be callable (texts -> scores, or tokens -> scores with score_tokens=True).")
        if not isinstance(sample_size, (int, np.integer)) or sample_size < 1:
            raise ValueError(f"sample_size must be an int >= 1, got {sample_size!r}.")
        if not isinstance(n_candidates, (int, np.integer)) or not 1 <= n_candidates <= sample_size:
            raise ValueError(f"n_candidates must be between 1 and sample_size={sample_size}, got {n_candidates!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.queries_to_scores = queries_to_scores
        self.length_sampler = length_sampler
        self.gen_config = generation_config
        self.sample_size = int(sample_size)
        self.n_candidates = int(n_candidates)
        self.score_tokens = score_tokens
        self._rng = jax.random.PRNGKey(0 if seed is None else seed)

    def _setting(self, name: str, generation_kwargs: dict) -> Any:
        """A generation setting as ``generate`` resolves it: kwargs, then the passed config,
        then the model's generation config."""
        if name in generation_kwargs:
            return generation_kwargs[name]
        for source in (self.gen_config, self.model.generation_config):
            value = getattr(source, name, None)
            if value is not None:
                return value
        return None

    def generate(
        self,
        tokenized_query: Union[List[int], Any, List[Any], List[List[int]]],
        skip_special_tokens: bool = True,
        device: Any = None,
        *,
        rng: Optional[jax.Array] = None,
        **generation_kwargs: Any,
    ) -> List[List[str]]:
        """The ``n_candidates`` best of ``sample_size`` samples for each query, best first.

        tokenized_query: one query (list of ints, 1-D array/tensor) or a batch (list of those).
        Texts are the decoded query + sample (TRL decodes ``generate``'s whole output).
        ``generation_kwargs`` override the generation config (HF names). Returns one list of
        ``n_candidates`` strings per query.
        """
        del device
        queries = _query_list(tokenized_query)
        n_q, n_s = len(queries), self.sample_size
        if self.length_sampler is not None:
            if "max_new_tokens" in generation_kwargs:
                raise ValueError("max_new_tokens comes from length_sampler; drop it from generation_kwargs "
                                 "(or build the sampler with length_sampler=None).")
            lengths = np.array([int(self.length_sampler()) for _ in queries])
        else:
            new = self._setting("max_new_tokens", generation_kwargs)
            if new is None:
                raise ValueError("length_sampler is None and no max_new_tokens is set; pass one of them.")
            lengths = np.full((n_q,), int(new))
        if (lengths < 1).any():
            raise ValueError(f"length_sampler gave {lengths.min()} new tokens; it must give >= 1.")
        kwargs = {k: v for k, v in generation_kwargs.items() if k != "max_new_tokens"}
        pad = self._setting("pad_token_id", kwargs)
        pad = self.tokenizer.pad_token_id if pad is None else pad
        pad = 0 if pad is None else int(pad)
        P = bucket_length(max(len(q) for q in queries), _PAD_MULTIPLE)
        rows = [q for q in queries for _ in range(n_s)]  # query-major: row i*n_s + j is sample j of query i
        # Static shapes: rows padded to a power of two (copies of row 0, dropped below) and the
        # decode length to a multiple of 8 (token t does not depend on the total length).
        n_rows = 1 << (len(rows) - 1).bit_length()
        padded_rows = rows + [rows[0]] * (n_rows - len(rows))
        ids = pad_sequences(padded_rows, pad, "left", P)
        mask = pad_sequences([np.ones(len(q), np.int32) for q in padded_rows], 0, "left", P)
        n_new = bucket_length(int(lengths.max()), _PAD_MULTIPLE)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None:
            n_new = max(int(lengths.max()), min(n_new, int(positions) - P))
        if rng is None:
            self._rng, rng = jax.random.split(self._rng)
        # ONE generation call for all queries x samples.
        seqs = np.asarray(self.model.generate(ids, attention_mask=mask, generation_config=self.gen_config, rng=rng,
                                              max_new_tokens=n_new, **kwargs))
        ids, mask = ids[: len(rows)], mask[: len(rows)]
        responses = seqs[: len(rows), P:]
        eos = self._setting("eos_token_id", kwargs)
        eos = [] if eos is None else [int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos]
        limit = np.repeat(lengths, n_s)  # each query's own drawn length
        if eos and responses.shape[1]:
            hit = np.isin(responses, eos)
            first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, responses.shape[1])
            limit = np.minimum(limit, first)
        keep = np.arange(responses.shape[1])[None, :] < limit[:, None]
        if self.score_tokens:
            full = np.concatenate([ids, np.where(keep, responses, pad)], axis=1)
            full_mask = np.concatenate([mask, keep.astype(np.int32)], axis=1)
            scores = jnp.asarray(self.queries_to_scores(jnp.asarray(full), jnp.asarray(full_mask)), jnp.float32)
            if scores.shape != (n_q * n_s,):
                raise ValueError(f"queries_to_scores returned shape {scores.shape}, expected ({n_q * n_s},).")
            best = np.asarray(jax.lax.top_k(scores.reshape(n_q, n_s), self.n_candidates)[1])
            texts = {}
        else:
            texts = dict(enumerate(self._decode(rows, responses, limit, range(n_q * n_s), skip_special_tokens)))
            scores = np.asarray([float(np.asarray(s)) for s in self.queries_to_scores([texts[i] for i in range(len(rows))])])
            if scores.shape != (n_q * n_s,):
                raise ValueError(f"queries_to_scores returned {scores.shape[0]} scores for {n_q * n_s} texts.")
            best = np.argsort(-scores.reshape(n_q, n_s), axis=1, kind="stable")[:, : self.n_candidates]
        chosen = [i * n_s + int(j) for i in range(n_q) for j in best[i]]
        missing = [i for i in chosen if i not in texts]
        texts.update(zip(missing, self._decode(rows, responses, limit, missing, skip_special_tokens)))
        return [[texts[i * n_s + int(j)] for j in best[i]] for i in range(n_q)]

    def _decode(self, rows: Sequence[np.ndarray], responses: np.ndarray, limit: np.ndarray, which: Sequence[int],
                skip_special_tokens: bool) -> List[str]:
        seqs = [np.concatenate([rows[i], responses[i, : limit[i]]]).tolist() for i in which]
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens) if seqs else []
