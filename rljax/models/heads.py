"""Heads over the causal LMs: TRL's value head and HF's sequence-classification score head.

Parameter layout: flat, so the HF/TRL state dict is ``hf_name`` of each path, no renaming.

CausalLMWithValueHead: the LM's own params plus ``v_head``::

    {"transformer" | "model": ..., ["lm_head": ...,] "v_head": {"summary": {"kernel": [hidden, 1], "bias": [1]}}}
    -> TRL's state dict: the base model's keys + v_head.summary.weight [1, hidden] + v_head.summary.bias [1]

  The LM shares the wrapper's scope (``nn.share_scope``), so ``{k: v for k, v in params.items()
  if k != "v_head"}`` are plain LM params (``lm_params``), usable with the LM module, generation
  and ``rljax.models.save_pretrained`` as they are; and a TRL checkpoint loads with no renaming.

SequenceScoreModel: the LM trunk's params plus ``score`` (HF ``*ForSequenceClassification``)::

    {"transformer" | "model": ..., "score": {"kernel": [hidden, num_labels]}}
    -> transformer.* / model.* + score.weight [num_labels, hidden] (no bias)
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rljax.models.attention import prepare_inputs, supports_logits_window, window_positions
from rljax.models.hub import (
    abstract_params,
    as_jax_dtype,
    merge_dtype_args,
    config_from_dict,
    family_of,
    load_state_dict,
    model_from_config,
    read_checkpoint,
    save_pretrained,
    state_dict_to_params,
)

V_HEAD_INIT_STRATEGIES = (None, "normal")


def torch_linear_init(fan_in: int):
    """torch ``nn.Linear``'s default init for weight and bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- value head ------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """TRL's ValueHead: dropout, then ``summary`` = Linear(hidden, 1), in float32.

    ``summary_dropout_prob`` 0 or None means no dropout (TRL's Identity). ``init_strategy``:
    None is TRL's random init (torch ``nn.Linear``'s default: kernel and bias both
    uniform(-1/sqrt(hidden), 1/sqrt(hidden))); "normal" draws the kernel from
    N(0, initializer_range) with a zero bias, as TRL's "normal" strategy does.
    Params are float32 whatever the LM's dtype, and the input is upcast to float32 (TRL upcasts
    to the summary weight's dtype). ``__call__(hidden [batch, seq, hidden]) -> [batch, seq]``.
    """

    summary_dropout_prob: Optional[float] = 0.1
    init_strategy: Optional[str] = None
    initializer_range: float = 0.2

    @nn.compact
    def __call__(self, hidden_states: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.init_strategy not in V_HEAD_INIT_STRATEGIES:
            raise ValueError(
                f"v_head_init_strategy must be one of {V_HEAD_INIT_STRATEGIES}, got {self.init_strategy!r}."
            )
        x = hidden_states.astype(jnp.float32)
        if self.summary_dropout_prob:
            x = nn.Dropout(self.summary_dropout_prob)(x, deterministic=deterministic)
        if self.init_strategy == "normal":
            init = dict(kernel_init=nn.initializers.normal(self.initializer_range), bias_init=nn.initializers.zeros)
        else:
            init = dict(kernel_init=torch_linear_init(x.shape[-1]), bias_init=torch_linear_init(x.shape[-1]))
        summary = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, name="summary", **init)
        return summary(x)[..., 0]


@flax.struct.dataclass
class CausalLMWithValueHeadOutput:
    """``logits`` [batch, seq, vocab] (float32), ``values`` [batch, seq] (float32, from the last
    hidden state; both [batch, length, ...] under a ``logits_window``), ``hidden_states`` [batch, seq, hidden], ``cache`` (as the LM's)."""

    logits: jax.Array
    values: jax.Array
    hidden_states: jax.Array
    cache: Optional[Any] = None


class _WrapsLM:
    """What a value-head wrapper forwards to its ``lm``: config, dtype, cache, config.json."""

    @property
    def config(self):
        return self.lm.config

    @property
    def dtype(self):
        return self.lm.dtype

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        return self.lm.init_cache(batch_size, max_length, dtype)

    def hf_config_dict(self) -> dict:
        """The base model's config.json, plus ``summary_dropout_prob`` (TRL reads it from the config)."""
        d = self.lm.config.to_dict()
        d["summary_dropout_prob"] = self.summary_dropout_prob
        return d


class CausalLMWithValueHead(_WrapsLM, nn.Module):
    """A causal LM plus TRL's value head; the LM's ``__call__``/``init_cache`` contract, with
    ``values`` added to the output. Param layout: see the module docstring."""

    lm: nn.Module
    summary_dropout_prob: Optional[float] = 0.1
    v_head_init_strategy: Optional[str] = None
    v_head_initializer_range: float = 0.2

    def setup(self):
        nn.share_scope(self, self.lm)  # LM params at the top level, beside "v_head"
        self.v_head = ValueHead(self.summary_dropout_prob, self.v_head_init_strategy, self.v_head_initializer_range)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        cache: Optional[dict] = None,
        deterministic: bool = True,
        logits_window: Optional[Tuple[int, int]] = None,
    ) -> CausalLMWithValueHeadOutput:
        # logits_window (static (start, length)): both heads run on those columns only.
        out = apply_lm_windowed(self.lm, input_ids, attention_mask, position_ids, cache, deterministic, logits_window)
        values = self.v_head(window_positions(out.hidden_states, logits_window), deterministic)
        return CausalLMWithValueHeadOutput(out.logits, values, out.hidden_states, out.cache)


def apply_lm_windowed(lm, input_ids, attention_mask, position_ids, cache, deterministic, logits_window):
    """Call the bound ``lm`` with its LM head on ``logits_window`` only (sliced afterwards when
    ``lm`` does not take the argument)."""
    if logits_window is None:
        return lm(input_ids, attention_mask, position_ids, cache, deterministic)
    if supports_logits_window(lm):
        return lm(input_ids, attention_mask, position_ids, cache, deterministic, logits_window=logits_window)
    out = lm(input_ids, attention_mask, position_ids, cache, deterministic)
    return out.replace(logits=window_positions(out.logits, logits_window))


@flax.struct.dataclass
class Seq2SeqLMWithValueHeadOutput:
    """``logits`` [batch, dec_len, vocab] (float32), ``values`` [batch, dec_len] (float32, from the
    decoder's last hidden state), ``hidden_states`` (decoder, [batch, dec_len, d_model]),
    ``encoder_hidden_states`` [batch, enc_len, d_model], ``cache`` (the decoder cache or None)."""

    logits: jax.Array
    values: jax.Array
    hidden_states: jax.Array
    encoder_hidden_states: Optional[jax.Array] = None
    cache: Optional[Any] = None


class Seq2SeqLMWithValueHead(_WrapsLM, nn.Module):
    """An encoder-decoder LM (T5) plus TRL's value head on the decoder's last hidden state
    (TRL's ``AutoModelForSeq2SeqLMWithValueHead``). Params: the LM's at the top level, plus
    ``v_head`` (as ``CausalLMWithValueHead``). ``__call__(input_ids [B, S], attention_mask,
    decoder_input_ids [B, T], decoder_attention_mask, encoder_hidden_states=None, cache=None,
    deterministic=True) -> Seq2SeqLMWithValueHeadOutput``."""

    lm: nn.Module
    summary_dropout_prob: Optional[float] = 0.1
    v_head_init_strategy: Optional[str] = None
    v_head_initializer_range: float = 0.2
    is_encoder_decoder = True

    def setup(self):
        nn.share_scope(self, self.lm)
        self.v_head = ValueHead(self.summary_dropout_prob, self.v_head_init_strategy, self.v_head_initializer_range)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_hidden_states=None, cache=None, deterministic: bool = True) -> Seq2SeqLMWithValueHeadOutput:
        out = self.lm(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                      cache, deterministic)
        values = self.v_head(out.hidden_states, deterministic)
        return Seq2SeqLMWithValueHeadOutput(out.logits, values, out.hidden_states, out.encoder_hidden_states, out.cache)


def is_value_head_module(module) -> bool:
    return isinstance(module, (CausalLMWithValueHead, Seq2SeqLMWithValueHead))


def lm_params(params) -> dict:
    """The plain LM params of a value-head model (everything but ``v_head``)."""
    return {k: v for k, v in params.items() if k != "v_head"}


def init_value_head(module, rng: jax.Array) -> dict:
    """Fresh ``{"v_head": ...}`` params for ``module`` (the LM itself is not initialised)."""
    head = ValueHead(module.summary_dropout_prob, module.v_head_init_strategy, module.v_head_initializer_range)
    dummy = jnp.zeros((1, 1, trunk_output_size(module.config)), jnp.float32)
    return {"v_head": head.init(rng, dummy)["params"]}


def trunk_output_size(config) -> int:
    """Width of the trunk's last hidden state, which the heads read: ``hidden_size``, or OPT's
    ``word_embed_proj_dim`` (OPT projects its output down before the LM head; TRL sizes its
    value head the same way)."""
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


def _float32_head(params, key: str):
    params = dict(params)
    params[key] = jax.tree.map(lambda x: x.astype(jnp.float32), params[key])
    return params


def value_head_model_from_pretrained(
    path_or_id: str,
    dtype=None,
    *,
    summary_dropout_prob: Optional[float] = None,
    v_head_init_strategy: Optional[str] = None,
    v_head_initializer_range: float = 0.2,
    rng: Optional[jax.Array] = None,
    torch_dtype=None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> Tuple[nn.Module, dict]:
    """Load an HF causal-LM directory -> (CausalLMWithValueHead, params); an encoder-decoder
    (T5) directory gives a ``Seq2SeqLMWithValueHead`` instead.

    ``v_head.summary.{weight,bias}`` are loaded when the checkpoint has them (TRL / rljax
    value-head saves), else initialised from ``rng`` (default ``PRNGKey(0)``).
    ``summary_dropout_prob``: None reads the config's ``summary_dropout_prob``, else 0.1 (TRL).
    ``dtype`` (alias ``torch_dtype``; see ``rljax.models.hub.as_jax_dtype``) casts the LM
    (params and compute); the value head stays float32. ``revision``/``trust_remote_code``:
    as ``rljax.models.from_pretrained``.
    """
    directory, cfg = read_checkpoint(path_or_id, revision, trust_remote_code)
    dtype = as_jax_dtype(merge_dtype_args(dtype, torch_dtype), cfg)
    if summary_dropout_prob is None:
        summary_dropout_prob = cfg.get("summary_dropout_prob", 0.1)
    lm = model_from_config(config_from_dict(cfg), dtype=dtype or jnp.float32)
    wrapper = Seq2SeqLMWithValueHead if getattr(lm, "is_encoder_decoder", False) else CausalLMWithValueHead
    module = wrapper(lm, summary_dropout_prob, v_head_init_strategy, v_head_initializer_range)
    defaults = init_value_head(module, jax.random.PRNGKey(0) if rng is None else rng)
    params = state_dict_to_params(
        load_state_dict(directory), abstract_params(module), family_of(lm.config), dtype=None, defaults=defaults
    )
    if dtype is not None:
        params = {k: (v if k == "v_head" else jax.tree.map(lambda x: x.astype(dtype), v)) for k, v in params.items()}
    return module, params


def save_value_head_model(
    module: CausalLMWithValueHead, params, path: str, *, overwrite: bool = False, max_shard_size=None
) -> None:
    """Write an HF directory: transformers' AutoModelForCausalLM loads it (ignoring ``v_head.*``),
    TRL's and rljax's value-head loaders restore the value head exactly."""
    save_pretrained(module, params, path, overwrite=overwrite, max_shard_size=max_shard_size)


# --- sequence-score head ---------------------------------------------------------------------


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (rightmost mask == 1), for left or right padding. [batch]."""
    positions = jnp.arange(attention_mask.shape[-1])[None, :]
    return jnp.argmax(positions * (attention_mask > 0), axis=-1)


@flax.struct.dataclass
class SequenceScoreOutput:
    """``logits`` [batch, num_labels] (float32): the score at each row's last real token;
    ``hidden_states`` [batch, seq, hidden]; ``last_index`` [batch]."""

    logits: jax.Array
    hidden_states: jax.Array
    last_index: jax.Array


class SequenceScoreModel(nn.Module):
    """HF ``*ForSequenceClassification`` (the reward-model head): the LM trunk, then
    ``score`` = Linear(hidden, num_labels, no bias), read at the last token with mask 1.

    ``__call__(input_ids [batch, seq], attention_mask=None, position_ids=None,
    deterministic=True) -> SequenceScoreOutput`` with ``.logits`` [batch, num_labels].
    Positions default to ``cumsum(mask) - 1``, so left- and right-padded rows score alike.
    HF picks the last token that is not ``pad_token_id``; with the mask we also handle
    pad == eos inside the text.
    """

    config: Any
    num_labels: int = 1
    dtype: Any = jnp.float32
    label_names: Optional[Tuple[str, ...]] = None

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> SequenceScoreOutput:
        attention_mask, position_ids = prepare_inputs(input_ids, attention_mask, position_ids, None)
        family = family_of(self.config)
        hidden, _, _ = family.trunk_cls(self.config, self.dtype, name=family.trunk_name)(
            input_ids, attention_mask, position_ids, None, deterministic
        )
        score = nn.Dense(self.num_labels, use_bias=False, dtype=self.dtype, name="score",
                         kernel_init=nn.initializers.normal(self.config.initializer_range))
        last = last_token_index(attention_mask)
        pooled = hidden[jnp.arange(hidden.shape[0]), last]
        return SequenceScoreOutput(score(pooled).astype(jnp.float32), hidden, last)

    def hf_config_dict(self) -> dict:
        """config.json for transformers' ``{Family}ForSequenceClassification``."""
        d = self.config.to_dict()
        d["architectures"] = [f"{family_of(self.config).hf_prefix}ForSequenceClassification"]
        names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        d["id2label"] = {str(i): n for i, n in enumerate(names)}
        d["label2id"] = {n: i for i, n in enumerate(names)}
        return d


def init_score(module: SequenceScoreModel, rng: jax.Array) -> dict:
    """Fresh ``{"score": ...}`` params (N(0, initializer_range), as HF initialises it)."""
    init = nn.initializers.normal(module.config.initializer_range)
    dense = nn.Dense(module.num_labels, use_bias=False, kernel_init=init)
    return {"score": dense.init(rng, jnp.zeros((1, trunk_output_size(module.config)), jnp.float32))["params"]}


def sequence_score_from_pretrained(
    path_or_id: str,
    num_labels: Optional[int] = None,
    dtype=None,
    *,
    rng: Optional[jax.Array] = None,
    torch_dtype=None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> Tuple[SequenceScoreModel, dict]:
    """Load an HF directory -> (SequenceScoreModel, params).

    A ``*ForSequenceClassification`` checkpoint loads its ``score``; a causal-LM checkpoint
    drops ``lm_head`` and gets a fresh ``score`` from ``rng`` (as transformers does).
    ``num_labels``: None reads the config's ``id2label`` (or ``num_labels``), else 2 (HF's default);
    reward models use ``num_labels=1``. Save with ``rljax.models.save_pretrained(module, params, dir)``.
    ``dtype``/``torch_dtype``/``revision``/``trust_remote_code``: as ``rljax.models.from_pretrained``.
    """
    directory, cfg = read_checkpoint(path_or_id, revision, trust_remote_code)
    dtype = as_jax_dtype(merge_dtype_args(dtype, torch_dtype), cfg)
    names = None
    if "id2label" in cfg:
        names = tuple(cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int))
    if num_labels is None:
        num_labels = len(names) if names else int(cfg.get("num_labels", 2))
    if names is not None and len(names) != num_labels:
        names = None
    module = SequenceScoreModel(config_from_dict(cfg), num_labels, dtype or jnp.float32, names)
    defaults = init_score(module, jax.random.PRNGKey(0) if rng is None else rng)
    params = state_dict_to_params(
        load_state_dict(directory), abstract_params(module), family_of(module.config), dtype=dtype,
        defaults=defaults, ignore=(r"^lm_head\.", r"^embed_out\.", r"^v_head\."),
    )
    return module, params


def __getattr__(name: str):
    # The TRL-style shell lives in rljax.models.auto (it imports this module); keep this path working.
    if name == "AutoModelForCausalLMWithValueHead":
        from rljax.models.auto import AutoModelForCausalLMWithValueHead

        return AutoModelForCausalLMWithValueHead
    raise AttributeError(f"module 'rljax.models.heads' has no attribute {name!r}")
