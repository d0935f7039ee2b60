"""TRL 0.7.11's ``TextEnvironment``: a model talks to tools through text, then gets a reward.

Protocol (TRL's): the model writes ``<request><ToolName>query<call>``; the environment runs
``tools["ToolName"](query)`` and appends ``result<response>``; the model continues, and ends
its episode with ``<submit>`` (or eos, or a turn without a tool call). ``run(tasks)`` plays
every episode to the end and returns ``(queries, responses, masks, rewards, histories)``,
ready for ``PPOTrainer.step(queries, responses, rewards, response_masks=masks)`` (the masks
leave the tool responses out of the loss).

Generation for all active episodes of a turn is one batched call of
``rljax.generation.generate`` (left-padded to bucketed lengths, so a run compiles a handful
of programs). Rows stop on ``<call>`` / ``<submit>`` inside the jitted decode loop: the stop
strings' token ids (:func:`rljax.generation.stop_sequences_for`) are matched on device, with
no Python callback per token; the host then cuts each response where its decoded text first
contains a stop string (TRL's ``StringStoppingCriteria`` rule), which also covers a stop
string tokenized differently in context.

Deliberate differences from TRL 0.7.11:

- ``max_length`` counts the history's tokens (TRL re-tokenizes the text and takes ``len`` of
  the first id, which raises).
- An unknown tool answers ``"Unknown tool X."`` (TRL overwrites that message with the
  ``KeyError`` it then raises: ``"Tool error: 'X'"``).
- Tool responses are tokenized without special tokens (a BOS-adding tokenizer would put a
  BOS in the middle of the episode in TRL).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from rljax.data.padding import bucket_length, pad_sequences
from rljax.environment.history import TextHistory, _as_tokens
from rljax.environment.tools import tool_name

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' generate default (20 new tokens)


def _model_params(model: Any) -> Tuple[Any, Any]:
    """(module, params) of an rljax model shell (its CURRENT params: PPOTrainer.step updates
    them in place) or of a ``(module, params)`` pair."""
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if hasattr(model, "module") and hasattr(model, "params"):
        return model.module, model.params
    raise ValueError(
        f"model must be an rljax model shell (e.g. AutoModelForCausalLMWithValueHead, trainer.model) or a "
        f"(module, params) pair, got {type(model).__name__}."
    )


class TextEnvironment:
    """Run a model with tools on text tasks (TRL's constructor; ``max_tool_reponse`` keeps
    TRL's spelling, ``max_tool_response`` is accepted too).

    model: an rljax model shell (``AutoModelForCausalLMWithValueHead``; pass the object a
        ``PPOTrainer`` trains so each ``run`` samples from the current policy) or a
        ``(module, params)`` pair. tokenizer: its HF tokenizer. tools: a list (named by class,
        or a function's name) or a ``{name: callable(str) -> str}`` dict. reward_fn:
        ``(last segments: list[str], **run_kwargs) -> list of rewards``. prompt: text put
        before every task. max_turns: model turns per episode. max_tool_reponse: characters
        kept from a tool's answer. max_length: episode length in tokens (longer: truncated).
        generation_kwargs: HF names (max_new_tokens per turn, do_sample, top_k, top_p,
        temperature, min_length, min_new_tokens, eos_token_id, pad_token_id). seed: the
        sampling key stream.
    """

    request_token = "<request>"
    call_token = "<call>"
    response_token = "<response>"
    submit_token = "<submit>"

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        tools: Any = None,
        reward_fn: Optional[Callable[..., Sequence[Any]]] = None,
        prompt: Optional[str] = None,
        max_turns: int = 4,
        max_tool_reponse: int = 100,
        max_length: Optional[int] = None,
        generation_kwargs: Optional[Dict[str, Any]] = None,
        *,
        max_tool_response: Optional[int] = None,
        seed: int = 0,
    ):
        if tokenizer is None:
            raise ValueError("TextEnvironment needs the model's tokenizer: pass tokenizer=...")
        if tools is None:
            raise ValueError("TextEnvironment needs tools: a list of callables or a {name: callable} dict.")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt or ""
        self.tools = dict(tools) if isinstance(tools, dict) else {tool_name(t): t for t in tools}
        self.reward_fn = reward_fn
        self.max_length = max_length
        self.max_turns = max_turns
        self.max_tool_response = max_tool_reponse if max_tool_response is None else max_tool_response
        self.generation_kwargs = dict(generation_kwargs or {})
        self._rng = jax.random.PRNGKey(seed)

    # -- the episode loop ---------------------------------------------------------------------
    def run(self, queries: Sequence[str], **rewards_kwargs: Any):
        """Play one episode per task. Returns ``(queries, responses, masks, rewards, histories)``:
        lists of 1-D int32 arrays (the prompt + task tokens; everything after them; 1 on the
        model's tokens), the rewards ``reward_fn`` gave, and the ``TextHistory`` objects."""
        if isinstance(queries, str):
            raise ValueError("run() takes a list of tasks; wrap a single task as [task].")
        texts = [self.prompt + task for task in queries]
        histories = [TextHistory(t, _as_tokens(self.tokenizer(t).input_ids), system=True) for t in texts]
        turns = 0
        while any(not h.completed for h in histories) and turns < self.max_turns:
            histories = self.generate(histories)
            histories = self.tasks_end_check(histories)
            histories = [self.step(h) for h in histories]
            histories = self.tasks_end_check(histories, model_turn=False)
            turns += 1
        self.compute_reward(histories, **rewards_kwargs)
        q, r, m = (list(x) for x in zip(*[h.split_query_response_tokens() for h in histories]))
        return q, r, m, [h.reward for h in histories], histories

    def step(self, history: TextHistory) -> TextHistory:
        """One environment turn: call the tool the last model segment requested and append its
        (truncated) answer plus ``<response>`` as a system segment."""
        truncated, ended = self.task_end_check(history)
        if ended:
            history.complete(truncated=truncated)
        if history.completed:
            return history
        tool, query = self.parse_tool_call(history.last_text_segment)
        if tool is None or query is None:
            response = f"Unknown tool call: {history.last_text_segment}"
        elif tool not in self.tools:
            response = f"Unknown tool {tool}."
        else:
            try:
                response = str(self.tools[tool](query))
            except Exception as error:  # a tool's failure is an answer the model sees, as in TRL
                response = f"Tool error: {error}"
        if len(response) > self.max_tool_response:
            response = response[: self.max_tool_response - 3] + "..."
        text = response + self.response_token
        history.append_segment(text, _as_tokens(self.tokenizer(text, add_special_tokens=False).input_ids), system=True)
        return history

    def parse_tool_call(self, text: str) -> Tuple[Optional[str], Optional[str]]:
        """``"...<request><Tool>query<call>"`` -> ``("Tool", "query")``; ``(None, None)`` when
        there is no request/call span or no ``<name>`` in it."""
        span = re.search(f"(?<={self.request_token}).*?(?={self.call_token})", text, re.DOTALL)
        if span is None:
            return None, None
        extracted = span.group()
        name = re.search(r"<(.*?)>", extracted)
        if name is None:
            return None, None
        return name.group(1), ">".join(extracted.split(">")[1:])

    def compute_reward(self, histories: List[TextHistory], **reward_kwargs: Any) -> List[TextHistory]:
        """Set each history's ``reward`` from ``reward_fn(last segments, **reward_kwargs)``."""
        if self.reward_fn is None:
            raise ValueError("TextEnvironment has no reward_fn; pass reward_fn=callable(list[str]) -> rewards.")
        rewards = self.reward_fn([h.last_text_segment for h in histories], **reward_kwargs)
        if len(rewards) != len(histories):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(histories)} histories.")
        for history, reward in zip(histories, rewards):
            history.reward = reward
        return histories

    def generate(self, histories: List[TextHistory]) -> List[TextHistory]:
        """Append one model segment to every active history (one batched generation)."""
        active = [i for i, h in enumerate(histories) if not h.completed]
        responses = self._generate_batched([histories[i].tokens for i in active])
        for i, tokens in zip(active, responses):
            histories[i].append_segment(self.tokenizer.decode(tokens.tolist()), tokens, system=False)
        return histories

    def tasks_end_check(self, histories: List[TextHistory], model_turn: bool = True) -> List[TextHistory]:
        """Mark finished histories complete (see ``task_end_check``)."""
        for history in histories:
            if not history.completed:
                truncated, ended = self.task_end_check(history, model_turn=model_turn)
                if ended:
                    history.complete(truncated=truncated)
        return histories

    def task_end_check(self, history: TextHistory, model_turn: bool = True) -> Tuple[bool, bool]:
        """``(truncated, ended)``: too long; eos in the text; a model turn with neither a tool
        call nor ``<submit>``; or ``<submit>``."""
        if history.completed:
            return False, False
        last = history.last_text_segment
        if self.max_length is not None and len(history.tokens) > self.max_length:
            return True, True
        eos = self.tokenizer.eos_token
        if eos and eos in history.text:
            return False, True
        if model_turn and not ((self.request_token in last and self.call_token in last) or self.submit_token in last):
            return False, True
        return False, self.submit_token in last

    # -- generation ---------------------------------------------------------------------------
    def _generation_settings(self, module: Any) -> Dict[str, Any]:
        from rljax.trainers.ppo import _hf_generation_kwargs

        kw = dict(self.generation_kwargs)
        kw.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kw = _hf_generation_kwargs(kw, pad)
        if "eos_token_id" not in kw:  # HF generate's default: the model config's eos, else the tokenizer's
            eos = getattr(getattr(module, "config", None), "eos_token_id", None)
            kw["eos_token_id"] = self.tokenizer.eos_token_id if eos is None else eos
        return kw

    def _stop_strings(self) -> Tuple[str, str]:
        return (self.call_token, self.submit_token)

    def _cut_at_stop(self, tokens: np.ndarray) -> np.ndarray:
        """The shortest prefix of ``tokens`` whose text contains a stop string (all of them when
        none does): TRL's ``StringStoppingCriteria`` per row, by bisection on the host."""
        def has_stop(n: int) -> bool:
            text = self.tokenizer.decode(tokens[:n].tolist())
            return any(s in text for s in self._stop_strings())

        if len(tokens) == 0 or not has_stop(len(tokens)):
            return tokens
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return tokens[:lo]

    def _generate_batched(self, query_tensors: Sequence[Any], batch_size: int = 16,
                          pad_to_multiple_of: Optional[int] = None) -> List[np.ndarray]:
        """Responses (1-D int32, cut after a stop string or eos) for 1-D query token arrays,
        ``batch_size`` rows per generation call. Rows are left-padded to a multiple of
        ``pad_to_multiple_of`` (default 32) and the batch to a power of two, so the shapes
        repeat across turns and runs."""
        from rljax.generation import generate, stop_sequences_for

        module, params = _model_params(self.model)
        kw = self._generation_settings(module)
        stops = stop_sequences_for(self.tokenizer, self._stop_strings())
        queries = [_as_tokens(q) for q in query_tensors]
        limit = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        outputs: List[np.ndarray] = []
        batch_size = max(1, min(len(queries), batch_size))
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            rows = chunk + [chunk[0]] * (min(batch_size, 1 << (len(chunk) - 1).bit_length()) - len(chunk))
            longest = max(len(q) for q in chunk)
            P = bucket_length(longest, pad_to_multiple_of or 32)
            if limit is not None:
                P = max(longest, min(P, int(limit) - int(kw["max_new_tokens"])))
            ids = pad_sequences(rows, kw["pad_token_id"], "left", P)
            mask = pad_sequences([np.ones(len(q), np.int32) for q in rows], 0, "left", P)
            self._rng, key = jax.random.split(self._rng)
            out = generate(module, params, ids, mask, key, stop_sequences=stops, **kw)
            seqs = np.asarray(out.sequences)[: len(chunk), P:]
            lengths = np.asarray(out.response_mask)[: len(chunk)].sum(axis=1)
            outputs.extend(self._cut_at_stop(row[:n].astype(np.int32)) for row, n in zip(seqs, lengths))
        return outputs
