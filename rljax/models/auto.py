"""HF/TRL-style model objects: ``AutoModelForCausalLM``, ``AutoModelForCausalLMWithValueHead``
(TRL), ``AutoModelForSequenceClassification``.

Each is a thin shell over a flax module and its params (``.module``, ``.params``; both plain,
assignable attributes, so a trainer can set ``model.params = trained`` and
``model.save_pretrained(dir)`` writes the trained weights). The shells give what HF/TRL
code touches: ``from_pretrained``, calling the model, ``.generate(**hf_kwargs)``,
``.save_pretrained``, ``.state_dict()`` (HF tensor names), a mutable ``.config`` and
``.generation_config``, and read-only HF-style weight access (``model.lm_head.weight``,
``model.v_head.summary.bias``, ``model.transformer``). The math stays in the modules and
``rljax.generation``.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from rljax.models.attention import CausalLM
from rljax.models.heads import (
    CausalLMWithValueHead,
    SequenceScoreModel,
    init_value_head,
    lm_params,
    sequence_score_from_pretrained,
    value_head_model_from_pretrained,
)
from rljax.models.hub import (
    _transposed,
    abstract_params,
    as_jax_dtype,
    family_of,
    from_pretrained as _lm_from_pretrained,
    hf_name,
    init_params,
    merge_dtype_args,
    model_from_config,
    params_to_state_dict,
    read_checkpoint,
    save_pretrained as _save_pretrained,
)

NOT_A_CAUSAL_LM = "The model does not have a language model head, please use a model that has one."

# from_pretrained kwargs HF/TRL scripts pass that change nothing here (memory/speed only).
_NO_EFFECT_KWARGS = ("low_cpu_mem_usage", "use_cache", "use_safetensors")
# ... and ones that are fine at their "off" value only.
_OFF_ONLY_KWARGS = {"device_map": None, "quantization_config": None, "load_in_8bit": False, "load_in_4bit": False,
                    "peft_config": None, "reward_adapter": None, "is_trainable": False, "cache_dir": None,
                    "token": None, "attn_implementation": None}
_QUANT_HINT = ("this loader keeps float weights; a quantized base trains only under LoRA: "
               "AutoModelForCausalLMWithValueHead.from_pretrained(..., peft_config=..., load_in_8bit=True)")
_PEFT_HINT = ("this loader takes no adapters: rljax.models.peft.get_peft_model(model, config), or "
              "AutoModelForCausalLMWithValueHead.from_pretrained(..., peft_config=...)")
_OFF_HINTS = {
    "device_map": "rljax places params with rljax.sharding (pass mesh= to a trainer)",
    "quantization_config": _QUANT_HINT, "load_in_8bit": _QUANT_HINT, "load_in_4bit": _QUANT_HINT,
    "peft_config": _PEFT_HINT, "reward_adapter": _PEFT_HINT, "is_trainable": _PEFT_HINT,
    "cache_dir": "hub downloads use huggingface_hub's default cache", "token": "log in with `huggingface-cli login`",
}


def _check_load_kwargs(owner: str, model_args: tuple, kwargs: Dict[str, Any]) -> None:
    """Honour-or-reject for HF loader kwargs: no-effect ones pass, anything else raises."""
    if model_args:
        raise ValueError(f"{owner}.from_pretrained takes no extra positional arguments, got {model_args!r}.")
    bad = []
    for k, v in kwargs.items():
        if k in _NO_EFFECT_KWARGS:
            continue
        if k == "attn_implementation" and v in (None, "eager", "sdpa"):
            continue  # one attention implementation, numerically that of "eager"
        if k in _OFF_ONLY_KWARGS and v == _OFF_ONLY_KWARGS[k]:
            continue
        hint = _OFF_HINTS.get(k, "not an rljax option")
        bad.append(f"{k}={v!r} ({hint})")
    if bad:
        raise ValueError(f"{owner}.from_pretrained got unsupported argument(s): {'; '.join(bad)}. Remove them.")


def _as_ids(x, name: str) -> jax.Array:
    """Token ids / masks from lists, numpy, jax or torch tensors -> int32 jax array."""
    if x is None:
        return None
    arr = np.asarray(x) if not isinstance(x, jax.Array) else x
    if not jnp.issubdtype(arr.dtype, jnp.integer) and not jnp.issubdtype(arr.dtype, jnp.bool_):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}.")
    return jnp.asarray(arr, jnp.int32)


# --------------------------------------------------------------------------------------------
# HF-style config and weight views
# --------------------------------------------------------------------------------------------


class HFConfig:
    """A mutable HF-style view of a frozen rljax config (``GPT2Config``, ``LlamaConfig``).

    Reads fall through to the frozen config. Setting a NEW attribute stores it beside it
    (``model.config.summary_dropout_prob = 0.5``, as scripts do with HF configs) and
    ``save_pretrained`` writes it to config.json. Setting an existing field (e.g.
    ``pad_token_id``) rebuilds the model's module with the new config; a change that would
    alter parameter shapes (``n_layer``, ``vocab_size``, ...) raises instead.
    """

    def __init__(self, frozen, on_change: Optional[Callable[[Any], None]] = None, extras: Optional[dict] = None):
        object.__setattr__(self, "_frozen", frozen)
        object.__setattr__(self, "_on_change", on_change)
        object.__setattr__(self, "_extras", dict(extras or {}))

    @property
    def frozen(self):
        """The underlying (hashable) rljax config."""
        return self._frozen

    @property
    def extras(self) -> dict:
        return dict(self._extras)

    def __getattr__(self, name: str):
        if name.startswith("__") or "_frozen" not in self.__dict__:  # copy/pickle probes
            raise AttributeError(name)
        extras = self.__dict__["_extras"]
        if name in extras:
            return extras[name]
        return getattr(self.__dict__["_frozen"], name)

    def __setattr__(self, name: str, value) -> None:
        frozen = self._frozen
        if name in {f.name for f in dataclasses.fields(frozen)}:
            new = dataclasses.replace(frozen, **{name: value})
            if self._on_change is not None:
                self._on_change(new)
            object.__setattr__(self, "_frozen", new)
        else:
            self._extras[name] = value

    def to_dict(self) -> dict:
        d = self._frozen.to_dict()
        d.update(self._extras)
        return d

    def __eq__(self, other) -> bool:
        if isinstance(other, HFConfig):
            return self._frozen == other._frozen and self._extras == other._extras
        return self._frozen == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"HFConfig({self._frozen!r}, extras={self._extras!r})"


class WeightsView:
    """Read-only HF-style attribute access to params: ``view.transformer.h[0].attn.c_attn.weight``.

    Leaves come back in HF layout (``nn.Linear`` weights ``[out, in]``) as jax arrays.
    ``aliases`` maps extra HF names onto existing ones (tied ``lm_head.weight`` -> embeddings).
    """

    def __init__(self, params, family, prefix: str = "", aliases: Optional[Dict[str, str]] = None):
        self._params, self._family, self._prefix, self._aliases = params, family, prefix, dict(aliases or {})
        self._names = None

    def _leaves(self) -> Dict[str, Tuple[str, ...]]:
        if self._names is None:
            self._names = {hf_name(p): p for p in flatten_dict(self._params)}
        return self._names

    def _get(self, key: str):
        names = self._leaves()
        key = self._aliases.get(key, key)
        if key in names:
            path = names[key]
            value = self._params
            for p in path:
                value = value[p]
            return value.T if _transposed(path, key, self._family) else value
        full = list(names) + list(self._aliases)
        if any(n.startswith(key + ".") for n in full):
            return WeightsView(self._params, self._family, key + ".", self._aliases)
        raise AttributeError(f"no weight or submodule {key!r} (HF names of this model: {sorted(names)[:6]} ...)")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._get(self._prefix + name)

    def __getitem__(self, index: int):
        return self._get(f"{self._prefix}{int(index)}")

    def __repr__(self) -> str:
        return f"WeightsView({self._prefix.rstrip('.') or '<model>'})"


def _tied_aliases(config, params) -> Dict[str, str]:
    """``lm_head.weight`` -> the input embedding for tied models (torch lists both names)."""
    family = family_of(config)
    head = family.tied_key or "lm_head.weight"
    if not getattr(config, "tie_word_embeddings", False) or head.split(".")[0] in params:
        return {}
    for key in (family.embed_key,) if family.embed_key else ("transformer.wte.weight", "model.embed_tokens.weight"):
        top = key.split(".")[0]
        if top in params:
            return {head: key}
    return {}


def _hf_state_dict(config, params) -> Dict[str, np.ndarray]:
    sd = params_to_state_dict(params, family_of(config))
    for alias, key in _tied_aliases(config, params).items():
        sd[alias] = sd[key]
    return sd


def _check_same_shapes(module, params, what: str) -> None:
    new = {hf_name(p): tuple(v.shape) for p, v in flatten_dict(abstract_params(module)).items()}
    old = {hf_name(p): tuple(np.shape(v)) for p, v in flatten_dict(params).items()}
    if new != old:
        diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))[:5]
        raise ValueError(
            f"Setting config.{what} changes the model's parameters ({diff} ...); build a new model "
            "(AutoModelForCausalLM.from_config) instead of editing the config of a loaded one."
        )


# --------------------------------------------------------------------------------------------
# Generation with HF's kwargs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationConfig:
    """HF ``GenerationConfig``'s fields that rljax honours, with HF's defaults.

    Loaded from the checkpoint's ``generation_config.json`` (else from config.json's token ids).
    ``unsupported`` keeps settings from the file that rljax does not implement; ``generate``
    raises if one of them is set to a non-default value.
    """

    max_length: Optional[int] = None  # None: 20 new tokens (transformers' default), else prompt included
    max_new_tokens: Optional[int] = None
    min_length: int = 0
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_return_sequences: int = 1
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    unsupported: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_model(cls, config, directory: Optional[str] = None) -> "GenerationConfig":
        gc = cls(bos_token_id=getattr(config, "bos_token_id", None), eos_token_id=getattr(config, "eos_token_id", None),
                 pad_token_id=getattr(config, "pad_token_id", None))
        path = os.path.join(directory, "generation_config.json") if directory else None
        if path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            names = {f.name for f in dataclasses.fields(cls)} - {"unsupported"}
            for k, v in data.items():
                if k in names and v is not None:
                    setattr(gc, k, list(v) if isinstance(v, tuple) else v)
                elif k in UNSUPPORTED_GENERATION_DEFAULTS:
                    gc.unsupported[k] = v
        if isinstance(gc.eos_token_id, tuple):
            gc.eos_token_id = list(gc.eos_token_id)
        return gc

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "unsupported" and v is not None}
        d.update(self.unsupported)
        return d

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


# HF generate settings rljax does not implement -> their "off" value (None = unset).
UNSUPPORTED_GENERATION_DEFAULTS = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "diversity_penalty": 0.0, "renormalize_logits": False, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": None,
    "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
    "output_attentions": False, "output_hidden_states": False, "constraints": None, "logits_processor": None,
    "stopping_criteria": None, "prefix_allowed_tokens_fn": None, "streamer": None, "assistant_model": None,
    "max_time": None, "stop_strings": None, "synced_gpus": None, "negative_prompt_ids": None,
}
# Accepted with no effect: beam-search-only settings (no beams here, so none in HF either),
# the cache switch (rljax always decodes with its KV cache; same tokens) and start-token ids.
_NO_EFFECT_GENERATION = ("length_penalty", "early_stopping", "use_cache", "decoder_start_token_id",
                         "transformers_version", "_from_model_config")
_GEN_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "unsupported")
_GEN_PAD_MULTIPLE = 8
DEFAULT_NEW_TOKENS = 20


def _generation_settings(base: GenerationConfig, generation_config, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Merge the model's generation config, a passed ``generation_config`` and kwargs (in that
    order of precedence, last wins), honouring or rejecting every setting."""
    objects = [generation_config]
    if not isinstance(base, GenerationConfig):  # e.g. a transformers.GenerationConfig assigned by the user
        objects, base = [base, generation_config], GenerationConfig()
    settings = {k: getattr(base, k) for k in _GEN_FIELDS}
    unsupported = dict(base.unsupported)
    sources = []  # (settings, from a GenerationConfig object?)
    for obj in objects:
        if obj is not None:
            src = obj.to_dict() if hasattr(obj, "to_dict") else dict(vars(obj))
            sources.append(({k: v for k, v in src.items() if v is not None}, True))
    sources.append((kwargs, False))
    for src, is_object in sources:
        for k, v in src.items():
            if k in _GEN_FIELDS:
                settings[k] = v
            elif k in UNSUPPORTED_GENERATION_DEFAULTS:
                unsupported[k] = v
            elif k in _NO_EFFECT_GENERATION or is_object:
                continue  # a GenerationConfig object carries many fields; only unsupported ones matter
            else:
                raise ValueError(
                    f"generate() got an unknown argument {k!r}; rljax honours {sorted(_GEN_FIELDS)} "
                    "(plus input_ids, attention_mask, generation_config, rng)."
                )
    bad = sorted(k for k, v in unsupported.items() if v != UNSUPPORTED_GENERATION_DEFAULTS[k])
    if bad:
        raise ValueError(
            f"generate() settings {bad} are not supported by rljax (sampling: do_sample, temperature, top_k, top_p; "
            "lengths: max_new_tokens/max_length, min_new_tokens/min_length; eos/pad ids). Remove them."
        )
    return settings


def hf_generate(
    module,
    params,
    base_config: GenerationConfig,
    rng: jax.Array,
    input_ids,
    attention_mask=None,
    generation_config=None,
    **kwargs,
) -> jax.Array:
    """HF ``model.generate`` semantics over ``rljax.generation.generate``.

    input_ids [batch, prompt] (left-padded when rows differ in length); returns the
    sequences, prompt included, [batch * num_return_sequences, prompt + steps] int32, where
    steps is the number of decoding steps run (it stops once every row has emitted eos;
    finished rows hold ``pad_token_id``). Defaults come from ``base_config`` (the model's
    generation config): greedy, 20 new tokens (capped at the model's positions; an explicit
    ``max_length`` counts the prompt), top_k 50 when sampling, as transformers' ``generate``.
    ``min_length`` counts the prompt (-1/0: off); ``pad_token_id`` None falls back to eos.
    """
    from rljax.data.padding import bucket_length
    from rljax.generation import generate

    s = _generation_settings(base_config, generation_config, kwargs)
    ids = _as_ids(input_ids, "input_ids")
    if ids is None or ids.ndim != 2:
        raise ValueError("generate() needs input_ids of shape [batch, prompt_len] (add a batch axis with ids[None]).")
    prompt_len = ids.shape[1]
    eos = s["eos_token_id"]
    eos_list = [] if eos is None else ([int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos])
    pad = s["pad_token_id"]
    if pad is None and eos_list:
        pad = eos_list[0]  # HF: "Setting pad_token_id to eos_token_id for open-end generation"
    if attention_mask is None:
        ids_np = np.asarray(ids)
        infer = pad is not None and (ids_np == pad).any() and pad not in eos_list
        mask = jnp.asarray(ids_np != pad, jnp.int32) if infer else jnp.ones_like(ids)
    else:
        mask = _as_ids(attention_mask, "attention_mask")
    limit = getattr(module.config, "max_position_embeddings", None)
    max_new = s["max_new_tokens"]
    if max_new is None and s["max_length"] is None:  # transformers: 20 new tokens, within the positions
        max_new = DEFAULT_NEW_TOKENS if limit is None else min(DEFAULT_NEW_TOKENS, int(limit) - prompt_len)
    elif max_new is None:
        max_new = int(s["max_length"]) - prompt_len
        if max_new < 1:
            raise ValueError(
                f"The prompt ({prompt_len} tokens) already reaches max_length={s['max_length']}; "
                "pass max_new_tokens=... (the number of tokens to generate)."
            )
    min_new = max(int(s["min_new_tokens"] or 0), int(s["min_length"] or 0) - prompt_len)
    n_seq = int(s["num_return_sequences"])
    if n_seq > 1:
        if not s["do_sample"]:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy search returns one sequence).")
        ids, mask = jnp.repeat(ids, n_seq, axis=0), jnp.repeat(mask, n_seq, axis=0)
    # Left-pad the prompt to a bucketed length so varying prompt lengths share compiled programs.
    padded = bucket_length(prompt_len, _GEN_PAD_MULTIPLE)
    if limit is not None:
        padded = max(prompt_len, min(padded, int(limit) - int(max_new)))
    extra = padded - prompt_len
    if extra:
        ids = jnp.pad(ids, ((0, 0), (extra, 0)), constant_values=0 if pad is None else pad)
        mask = jnp.pad(mask, ((0, 0), (extra, 0)))
    top_k = s["top_k"] if s["do_sample"] else 0
    out = generate(
        module, params, ids, mask, rng, max_new_tokens=int(max_new), do_sample=bool(s["do_sample"]),
        temperature=float(s["temperature"]) if s["do_sample"] else 1.0, top_k=0 if top_k is None else top_k,
        top_p=float(s["top_p"]) if s["do_sample"] else 1.0, min_new_tokens=int(min_new),
        eos_token_id=eos_list or None, pad_token_id=pad,
    )
    steps = int(jnp.max(jnp.sum(out.response_mask, axis=-1))) if eos_list else int(max_new)
    return out.sequences[:, extra: padded + steps]


# --------------------------------------------------------------------------------------------
# Outputs and jitted forwards
# --------------------------------------------------------------------------------------------


class ValueHeadModelOutput(tuple):
    """TRL's ``(lm_logits, loss, value)``, with attribute access as well.

    ``logits`` [batch, seq, vocab] float32; ``loss``: HF's causal-LM loss when ``labels`` were
    given, else None; ``values`` (alias ``value``) [batch, seq] float32; ``hidden_states``
    [batch, seq, hidden] (last layer); ``cache``: the updated KV cache or None.
    """

    def __new__(cls, logits, loss, values, hidden_states=None, cache=None):
        self = super().__new__(cls, (logits, loss, values))
        self.hidden_states, self.cache = hidden_states, cache
        return self

    logits = property(lambda self: self[0])
    loss = property(lambda self: self[1])
    values = property(lambda self: self[2])
    value = values


@dataclasses.dataclass
class CausalLMOutputWithLoss:
    """HF's ``CausalLMOutputWithPast`` subset: ``loss`` (with ``labels``) or None, ``logits``
    [batch, seq, vocab] float32, ``hidden_states`` [batch, seq, hidden] (last layer only),
    ``cache``. Indexing follows HF's ModelOutput: ``out[0]`` is the loss when there is one,
    else the logits."""

    loss: Optional[jax.Array]
    logits: jax.Array
    hidden_states: Optional[jax.Array] = None
    cache: Optional[Any] = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.loss, self.logits) if v is not None)

    def __getitem__(self, i):
        return self.to_tuple()[i]


_FORWARDS: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()


def _forward_fn(module) -> Callable:
    """One jitted ``(params, ids, mask, positions, cache, labels, rngs, deterministic) ->
    (module output, loss)`` per (equal) module, so equal models share compiled programs."""
    try:
        hash(module)
        key = module
    except TypeError:  # an unhashable module: key by identity (kept alive in the cache entry)
        key = id(module)
    if key in _FORWARDS:
        _FORWARDS.move_to_end(key)
        return _FORWARDS[key][1]

    def forward(params, input_ids, attention_mask, position_ids, cache, labels, rngs, deterministic):
        from rljax.losses import sft_loss

        out = module.apply({"params": params}, input_ids, attention_mask, position_ids, cache, deterministic,
                           rngs=rngs)
        return out, (None if labels is None else sft_loss(out.logits, labels))

    fn = jax.jit(forward, static_argnames=("deterministic",))
    _FORWARDS[key] = (module, fn)
    while len(_FORWARDS) > 32:
        _FORWARDS.popitem(last=False)
    return fn


def _prep_call(input_ids, attention_mask, position_ids, labels, past_key_values, kwargs):
    if past_key_values is not None:
        raise ValueError("past_key_values is not supported: rljax passes its KV cache explicitly (cache=...).")
    for k in ("output_hidden_states", "return_dict", "use_cache"):
        kwargs.pop(k, None)  # no effect: outputs always carry the last hidden state, forward never caches
    if kwargs:
        raise TypeError(f"unexpected argument(s) {sorted(kwargs)}; rljax models take input_ids, attention_mask, "
                        "position_ids, labels, cache, deterministic, rngs.")
    return (_as_ids(input_ids, "input_ids"), _as_ids(attention_mask, "attention_mask"),
            _as_ids(position_ids, "position_ids"), _as_ids(labels, "labels"))


# --------------------------------------------------------------------------------------------
# AutoModelForCausalLM
# --------------------------------------------------------------------------------------------


class AutoModelForCausalLM:
    """HF's ``AutoModelForCausalLM`` as a shell over (``.module``, ``.params``).

    ``from_pretrained(path, torch_dtype=..., revision=...)`` loads an HF checkpoint (GPT-2,
    Llama, Mistral, Qwen2); ``model(input_ids, attention_mask=..., labels=...)`` returns
    ``.logits`` (and HF's ``.loss`` with labels); ``model.generate(ids, max_new_tokens=...)``
    samples with HF's kwargs; ``save_pretrained(dir)`` writes the CURRENT ``.params``.
    ``module, params = model`` unpacks it.
    """

    name_or_path: Optional[str] = None  # HF's: the checkpoint it was loaded from (PEFT records it)

    def __init__(self, module, params, *, config_extras: Optional[dict] = None,
                 generation_config: Optional[GenerationConfig] = None, seed: int = 0):
        if getattr(module, "is_encoder_decoder", False) and not isinstance(self, AutoModelForSeq2SeqLM):
            raise ValueError("This is an encoder-decoder checkpoint (T5); load it with AutoModelForSeq2SeqLM "
                             "(or AutoModelForSeq2SeqLMWithValueHead), as transformers does.")
        self.module = module
        self.params = params
        self.config = HFConfig(module.config, self._config_changed, config_extras)
        self.generation_config = generation_config or GenerationConfig.from_model(module.config)
        self._rng = jax.random.PRNGKey(seed)

    # -- loading / saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, torch_dtype=None,
                        revision: Optional[str] = None, trust_remote_code: bool = False, **kwargs):
        """Load an HF causal-LM checkpoint directory (or hub id, online). ``torch_dtype``/``dtype``:
        a torch dtype, a name ("bfloat16", ...), "auto" or a jnp dtype; ``revision``: the hub
        version (a local directory ignores it); ``trust_remote_code=True`` raises."""
        _check_load_kwargs(cls.__name__, model_args, kwargs)
        directory, cfg = read_checkpoint(pretrained_model_name_or_path, revision, trust_remote_code)
        module, params = _lm_from_pretrained(directory, dtype, torch_dtype=torch_dtype)
        model = cls(module, params, config_extras=_config_extras(cfg),
                    generation_config=GenerationConfig.from_model(module.config, directory))
        model.name_or_path = str(pretrained_model_name_or_path)
        return model

    @classmethod
    def from_config(cls, config, *, dtype=None, torch_dtype=None, rng: Optional[jax.Array] = None):
        """A randomly initialised model (flax default init) for an rljax config, an
        ``HFConfig`` or a config.json dict."""
        extras = {}
        if isinstance(config, HFConfig):
            config, extras = config.frozen, config.extras
        dtype = as_jax_dtype(merge_dtype_args(dtype, torch_dtype))
        module = model_from_config(config, dtype=dtype or jnp.float32)
        return cls(module, init_params(module, jax.random.PRNGKey(0) if rng is None else rng), config_extras=extras)

    def save_pretrained(self, save_directory: str, *, overwrite: bool = False, max_shard_size=None,
                        safe_serialization: bool = True) -> None:
        """Write config.json, generation_config.json and safetensors weights of the current
        ``.params`` (refuses to overwrite existing weights unless ``overwrite=True``)."""
        if not safe_serialization:
            raise ValueError("rljax writes safetensors only; drop safe_serialization=False.")
        # The value head's own dropout (module field) wins over a config attribute of that name.
        extras = {k: v for k, v in self.config.extras.items() if not hasattr(self.module, k)}
        _save_pretrained(self.module, self.params, save_directory, overwrite=overwrite,
                         max_shard_size=max_shard_size, extra_config=extras)
        self.generation_config.save_pretrained(save_directory)

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError("push_to_hub is not implemented: save_pretrained(dir), then "
                                  "huggingface_hub.upload_folder(repo_id=..., folder_path=dir).")

    # -- running ------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic: bool = True,
                 rngs=None, *, labels=None, past_key_values=None, **kwargs) -> CausalLMOutputWithLoss:
        """Forward pass (jitted): input_ids [batch, seq] -> ``.logits`` [batch, seq, vocab];
        ``labels`` [batch, seq] (-100 = ignored) adds HF's shifted cross-entropy ``.loss``."""
        ids, mask, pos, labels = _prep_call(input_ids, attention_mask, position_ids, labels, past_key_values, kwargs)
        out, loss = _forward_fn(self.module)(self.params, ids, mask, pos, cache, labels, rngs,
                                             deterministic=deterministic)
        return CausalLMOutputWithLoss(loss, out.logits, out.hidden_states, out.cache)

    def generate(self, input_ids=None, attention_mask=None, *, generation_config=None, rng=None, inputs=None,
                 **kwargs) -> jax.Array:
        """HF ``generate``: [batch, prompt] ids (left-padded) -> [batch, prompt + steps] sequences.

        Kwargs as HF: max_new_tokens (or max_length, prompt included; default: 20 new tokens), do_sample
        (default False), temperature, top_k (default 50), top_p, min_length (counts the prompt;
        -1 = off), min_new_tokens, eos_token_id / pad_token_id (default: the generation config's),
        num_return_sequences. ``rng``: a PRNG key; without one each call draws a fresh key from
        the model's own key stream (seed 0), so runs are reproducible. Unsupported HF settings raise.
        """
        return hf_generate(self._lm_module(), self._lm_params(), self.generation_config, self._next_rng(rng),
                           input_ids if inputs is None else inputs, attention_mask, generation_config, **kwargs)

    # -- HF-style access ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """HF tensor name -> numpy array (tied ``lm_head.weight`` listed too, as torch does)."""
        return _hf_state_dict(self.module.config, self.params)

    def get_parameter(self, name: str):
        """One weight by its HF name, e.g. ``"transformer.h.0.attn.c_attn.weight"``."""
        return self._weights()._get(name)

    def __getattr__(self, name: str):
        # HF submodule access (model.transformer, model.lm_head.weight); reached only for
        # names that are not attributes of the shell itself.
        if name.startswith("_") or name in ("module", "params", "config"):
            raise AttributeError(name)
        return getattr(self._weights(), name)

    def __iter__(self):
        return iter((self.module, self.params))

    def __copy__(self):
        """A shallow copy (same arrays) whose config view and generation config are its own."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        if "config" in self.__dict__:
            other.config = HFConfig(self.config.frozen, other._config_changed, self.config.extras)
            other.generation_config = dataclasses.replace(self.generation_config)
        return other

    @property
    def dtype(self):
        return self.module.dtype

    def _weights(self) -> WeightsView:
        params = self.params
        return WeightsView(params, family_of(self.module.config), aliases=_tied_aliases(self.module.config, params))

    def _lm_module(self):
        return self.module

    def _lm_params(self):
        return self.params

    def _next_rng(self, rng):
        if rng is not None:
            return rng
        self._rng, key = jax.random.split(self._rng)
        return key

    def _config_changed(self, new_config) -> None:
        module = self.module.clone(config=new_config)
        _check_same_shapes(module, self.params, "that field")
        self.module = module


def _config_extras(cfg: dict) -> dict:
    """config.json entries beyond the rljax config's fields that TRL reads back as config
    attributes (``summary_dropout_prob``)."""
    return {k: cfg[k] for k in ("summary_dropout_prob",) if k in cfg}


def _is_causal_lm(module) -> bool:
    return isinstance(module, (CausalLM, CausalLMWithValueHead))


# --------------------------------------------------------------------------------------------
# AutoModelForCausalLMWithValueHead (TRL)
# --------------------------------------------------------------------------------------------


def _value_head_model_from(cls, source, not_an_lm: str, dtype, torch_dtype, revision, trust_remote_code, vkw: dict):
    """The body of both value-head shells' ``from_pretrained``: ``source`` is a checkpoint path,
    an instance of ``cls.transformers_parent_class`` (its config extras and generation config are
    kept) or an rljax ``(lm_module, lm_params)`` pair; ``vkw`` the value-head arguments."""
    if isinstance(source, (str, os.PathLike)):
        directory, cfg = read_checkpoint(source, revision, trust_remote_code)
        module, params = value_head_model_from_pretrained(directory, dtype, torch_dtype=torch_dtype, **vkw)
        model = cls(module, params, config_extras=_config_extras(cfg),
                    generation_config=GenerationConfig.from_model(module.config, directory))
        model.name_or_path = str(source)
        return model
    dtype = as_jax_dtype(merge_dtype_args(dtype, torch_dtype))
    parent = cls.transformers_parent_class
    if isinstance(source, parent):
        if vkw["summary_dropout_prob"] is None:
            vkw = dict(vkw, summary_dropout_prob=getattr(source.config, "summary_dropout_prob", None))
        model = cls.from_lm(source.module, source.params, dtype=dtype, **vkw)
        model.config = HFConfig(model.module.config, model._config_changed, source.config.extras)
        model.generation_config = dataclasses.replace(source.generation_config)
        model.name_or_path = source.name_or_path
        return model
    if isinstance(source, tuple) and len(source) == 2:
        return cls.from_lm(*source, dtype=dtype, **vkw)
    raise ValueError(f"{not_an_lm} rljax takes a checkpoint path, an {parent.__name__} or an "
                     f"(lm_module, lm_params) pair; got {type(source).__name__}.")


def _quantization_kind(quantization_config, load_in_8bit: bool, load_in_4bit: bool) -> Optional[str]:
    """rljax's weight-only scheme ("int8" / "nf4") from HF's loader arguments, or None."""
    if quantization_config is not None:
        from rljax.trainers.model_config import BitsAndBytesConfig

        if not isinstance(quantization_config, BitsAndBytesConfig):  # transformers' own: same fields
            quantization_config = BitsAndBytesConfig(**{f.name: getattr(quantization_config, f.name) for f in
                                                        dataclasses.fields(BitsAndBytesConfig)
                                                        if hasattr(quantization_config, f.name)})
        if load_in_8bit or load_in_4bit:
            raise ValueError("Pass either quantization_config or load_in_8bit/load_in_4bit, not both.")
        return quantization_config.quantization
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit cannot both be True: choose one precision.")
    return "int8" if load_in_8bit else "nf4" if load_in_4bit else None


def _read_v_head(directory: str) -> Optional[dict]:
    """``{"v_head": ...}`` params saved beside a PEFT adapter (rljax: model.safetensors; TRL:
    pytorch_model.bin, read with torch when installed), or None when there is none."""
    from rljax.models.hub import _read_safetensors

    path = os.path.join(directory, "model.safetensors")
    if os.path.exists(path):
        sd = _read_safetensors(path)
    elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
        import torch  # a TRL-saved value head (torch.save); torch is optional, needed only here

        sd = {k: v.float().numpy() for k, v in torch.load(os.path.join(directory, "pytorch_model.bin"),
                                                          map_location="cpu").items()}
    else:
        return None
    if "v_head.summary.weight" not in sd:
        return None
    return {"v_head": {"summary": {"kernel": jnp.asarray(np.asarray(sd["v_head.summary.weight"], np.float32).T),
                                   "bias": jnp.asarray(np.asarray(sd["v_head.summary.bias"], np.float32))}}}


def _attach_peft(model, *, lora=None, peft_config=None, adapter_dir=None, is_trainable=False, quantization=None,
                 reward_adapter=None, reward_adapter_name="reward_adapter"):
    """TRL's PEFT steps of ``from_pretrained`` on a value-head model: quantize the frozen base,
    then a saved adapter (``adapter_dir``, frozen unless ``is_trainable``, its value head if saved
    beside it) or a fresh one (``peft_config``), then the reward adapter. ``lora``: the config of
    adapters the model already has (a ``PeftModel`` source)."""
    from rljax.models.peft import PeftModel, get_peft_model, load_reward_adapter

    if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
        raise ValueError("The `reward_adapter` argument should be a string representing the name of local path or "
                         "the Hub id to the Reward Modeling adapter.")
    if quantization is not None and lora is None and peft_config is None and adapter_dir is None:
        raise ValueError(f"quantization ({quantization}) freezes the base: only LoRA adapters can train over it. Pass "
                         "peft_config=LoraConfig(...) (or load a PEFT adapter directory).")
    if quantization is not None:
        from rljax.models.quant import quantize_params

        model.params = quantize_params(model.params, quantization)
    if adapter_dir is not None:
        if peft_config is not None:
            warnings.warn(f"`peft_config` argument ignored since a peft config file was found in {adapter_dir}")
        pm = PeftModel.from_pretrained((model.module, model.params), str(adapter_dir), is_trainable=is_trainable)
        head = _read_v_head(str(adapter_dir))
        model.module, model.params, lora = pm.module, {**pm.params, **(head or {})}, pm.lora_config
    elif lora is None and peft_config is not None:
        pm = get_peft_model((model.module, model.params), peft_config)
        model.module, model.params, lora = pm.module, pm.params, pm.lora_config
    elif peft_config is not None:  # TRL ignores it silently for a PeftModel; say so
        warnings.warn("`peft_config` argument ignored: the model already has LoRA adapters (a PeftModel).")
    if lora is not None:
        if lora.base_model_name_or_path is None and model.name_or_path is not None:
            lora = dataclasses.replace(lora, base_model_name_or_path=model.name_or_path)
        model.lora_config, model.is_peft_model = lora, True
    if reward_adapter is not None:
        if not model.is_peft_model:
            raise ValueError("reward_adapter can only be used with a PeftModel. Pass peft_config=LoraConfig(...) too.")
        config, reward = load_reward_adapter(str(reward_adapter), model.params, family_of(model.module.config))
        model.reward_adapter_config, model.reward_adapter_params = config, reward
        model.supports_rm_adapter, model.rm_adapter_name = True, reward_adapter_name
    return model


class _ValueHeadView(WeightsView):
    """``model.v_head``: ``.summary.weight`` [1, hidden], ``.summary.bias`` [1], ``.dropout.p``."""

    def __init__(self, params, family, dropout_prob):
        super().__init__(params, family, "v_head.")
        self.dropout = _Dropout(dropout_prob or 0.0)


@dataclasses.dataclass
class _Dropout:
    p: float


class _PretrainedModel(AutoModelForCausalLM):
    """``value_head_model.pretrained_model``: the wrapped LM as an ``AutoModelForCausalLM``
    whose ``params``/``module``/``config`` read and write the value-head model's."""

    def __init__(self, owner: "AutoModelForCausalLMWithValueHead"):
        object.__setattr__(self, "_owner", owner)

    module = property(lambda self: self._owner.module.lm)
    config = property(lambda self: self._owner.config)
    generation_config = property(lambda self: self._owner.generation_config)

    @property
    def params(self):
        return lm_params(self._owner.params)

    @params.setter
    def params(self, value):
        self._owner.params = {**value, "v_head": self._owner.params["v_head"]}

    def _next_rng(self, rng):
        return self._owner._next_rng(rng)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if self._owner.is_peft_model:  # TRL's pretrained_model is then a PeftModel: the adapter files
            from rljax.models.peft import PeftModel

            PeftModel(self.module, self.params, self._owner.lora_config, base_model=self._owner).save_pretrained(
                save_directory)
            return
        config_extras = {k: v for k, v in self.config.extras.items() if k != "summary_dropout_prob"}
        AutoModelForCausalLM(self.module, self.params, config_extras=config_extras,
                             generation_config=self.generation_config).save_pretrained(save_directory, **kwargs)


class AutoModelForCausalLMWithValueHead(AutoModelForCausalLM):
    """TRL's ``AutoModelForCausalLMWithValueHead`` as a shell over (``.module``, ``.params``).

    ``module`` is a ``CausalLMWithValueHead``; ``params`` the LM's params plus ``v_head``.
    Calling it returns TRL's ``(lm_logits, loss, value)`` (a ``ValueHeadModelOutput``: also
    ``.logits``, ``.values``, ``.hidden_states``); ``generate`` runs the wrapped LM with HF's
    kwargs; ``v_head`` / ``pretrained_model`` / ``state_dict()`` / ``save_pretrained`` as TRL.
    ``module, params = model`` unpacks it for the functional API.
    """

    transformers_parent_class = AutoModelForCausalLM  # TRL's class attributes
    lm_head_namings = ["lm_head", "embed_out"]
    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
    # PEFT (set by from_pretrained): the policy adapter's LoraConfig; the reward adapter
    # (TRL's multi-adapter PPO): its LoraConfig and {"adapter": lora leaves, "score": head}.
    is_peft_model = False
    lora_config = None
    supports_rm_adapter = False
    rm_adapter_name = None
    policy_adapter_name = "default"
    reward_adapter_config = None
    reward_adapter_params = None

    def __init__(self, module: CausalLMWithValueHead, params: dict, *, config_extras: Optional[dict] = None,
                 generation_config: Optional[GenerationConfig] = None, seed: int = 0):
        if not isinstance(module, CausalLMWithValueHead):
            raise ValueError(NOT_A_CAUSAL_LM + f" (expected a CausalLMWithValueHead module, got {type(module).__name__})")
        super().__init__(module, params, config_extras=config_extras, generation_config=generation_config, seed=seed)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        dtype=None,
        torch_dtype=None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        summary_dropout_prob: Optional[float] = None,
        v_head_init_strategy: Optional[str] = None,
        v_head_initializer_range: float = 0.2,
        rng: Optional[jax.Array] = None,
        peft_config: Any = None,
        reward_adapter: Optional[str] = None,
        reward_adapter_name: str = "reward_adapter",
        is_trainable: bool = False,
        quantization_config: Any = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        **kwargs,
    ) -> "AutoModelForCausalLMWithValueHead":
        """From a checkpoint directory / hub id, an ``AutoModelForCausalLM`` (TRL: an already
        built transformers model), a ``rljax.models.peft.PeftModel`` (``get_peft_model``'s), a
        PEFT adapter directory, or an rljax ``(lm_module, lm_params)`` pair.

        The value head is loaded when the checkpoint has ``v_head.*`` tensors, else initialised
        from ``rng`` (default ``PRNGKey(0)``) with ``v_head_init_strategy`` (None: TRL's random
        init; "normal": N(0, ``v_head_initializer_range``) weight, zero bias).
        ``summary_dropout_prob``: given -> used; None -> the config's ``summary_dropout_prob``,
        else 0.1. Anything that is not a causal LM raises TRL's ValueError.

        PEFT (TRL 0.7.11): ``peft_config`` (a LoraConfig, rljax's or peft's) adds a fresh
        adapter; a directory holding ``adapter_config.json`` loads its base
        (``base_model_name_or_path``), then the adapter (frozen unless ``is_trainable``; the value
        head saved beside it, if any; ``peft_config`` is then ignored with a warning).
        ``reward_adapter``: a reward adapter directory (LoRA + ``score`` head, e.g. a
        ``RewardTrainer`` run with ``peft_config``) loaded onto the same base for
        ``compute_reward_score``. ``quantization_config`` (a ``BitsAndBytesConfig``) /
        ``load_in_8bit`` / ``load_in_4bit``: the frozen base's linear weights in int8 / NF4
        (``rljax.models.quant``); needs LoRA adapters.
        """
        _check_load_kwargs(cls.__name__, model_args, kwargs)
        from rljax.models.peft import ADAPTER_CONFIG_NAME, PeftModel, read_adapter_config

        vkw = dict(summary_dropout_prob=summary_dropout_prob, v_head_init_strategy=v_head_init_strategy,
                   v_head_initializer_range=v_head_initializer_range, rng=rng)
        source, adapter_dir, lora = pretrained_model_name_or_path, None, None
        if isinstance(source, PeftModel):  # get_peft_model(AutoModelForCausalLM...): keep its config objects
            lora, peft_model = source.lora_config, source
            if dtype is not None or torch_dtype is not None:
                raise ValueError("dtype/torch_dtype cannot recast a PeftModel; load the base in that dtype first.")
            base = peft_model.base_model
            if isinstance(base, AutoModelForCausalLM) and not isinstance(base, cls):
                source = copy.copy(base)
                source.module, source.params = peft_model.module, peft_model.params
            else:
                source = (peft_model.module, peft_model.params)
        elif isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, ADAPTER_CONFIG_NAME)):
            adapter_dir, source = source, read_adapter_config(str(source)).base_model_name_or_path
            if source is None:
                raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG_NAME} names no base_model_name_or_path; load the base "
                                 "model and pass it with PeftModel.from_pretrained(base, adapter_dir).")
        model = _value_head_model_from(cls, source, NOT_A_CAUSAL_LM, dtype, torch_dtype, revision, trust_remote_code,
                                       vkw)
        return _attach_peft(model, lora=lora, peft_config=peft_config, adapter_dir=adapter_dir,
                            is_trainable=is_trainable,
                            quantization=_quantization_kind(quantization_config, load_in_8bit, load_in_4bit),
                            reward_adapter=reward_adapter, reward_adapter_name=reward_adapter_name)

    @classmethod
    def from_lm(cls, lm_module, params, *, dtype=None, summary_dropout_prob=None, v_head_init_strategy=None,
                v_head_initializer_range=0.2, rng=None) -> "AutoModelForCausalLMWithValueHead":
        """Wrap an rljax causal LM (module, params); the value head is freshly initialised."""
        if isinstance(lm_module, CausalLMWithValueHead):
            return cls(lm_module, params)
        if not _is_causal_lm(getattr(lm_module, "base_module", lm_module)):  # a LoraModel wraps its LM
            raise ValueError(f"{NOT_A_CAUSAL_LM} Got a {type(lm_module).__name__}; pass a causal LM module "
                             "(e.g. from rljax.models.from_pretrained).")
        dtype = as_jax_dtype(dtype)
        if dtype is not None:
            lm_module = lm_module.clone(dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        module = CausalLMWithValueHead(
            lm_module, 0.1 if summary_dropout_prob is None else summary_dropout_prob,
            v_head_init_strategy, v_head_initializer_range,
        )
        head = init_value_head(module, jax.random.PRNGKey(0) if rng is None else rng)
        return cls(module, {**params, **head})

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, deterministic: bool = True,
                 rngs=None, *, labels=None, past_key_values=None, **kwargs) -> ValueHeadModelOutput:
        """TRL's forward (jitted): -> ``(lm_logits [B, T, V], loss, value [B, T])``; ``loss`` is
        the LM's cross-entropy on ``labels`` (-100 ignored) or None. Note the argument order:
        ``attention_mask`` is second here (TRL's second is ``past_key_values``; pass it by name)."""
        ids, mask, pos, labels = _prep_call(input_ids, attention_mask, position_ids, labels, past_key_values, kwargs)
        out, loss = _forward_fn(self.module)(self.params, ids, mask, pos, cache, labels, rngs,
                                             deterministic=deterministic)
        return ValueHeadModelOutput(out.logits, loss, out.values, out.hidden_states, out.cache)

    @property
    def v_head(self) -> _ValueHeadView:
        """TRL's ``v_head``: ``.summary.weight`` [1, hidden], ``.summary.bias`` [1], ``.dropout.p``."""
        return _ValueHeadView(self.params, family_of(self.module.config), self.module.summary_dropout_prob)

    @property
    def pretrained_model(self) -> _PretrainedModel:
        """The wrapped LM (an ``AutoModelForCausalLM`` sharing these params)."""
        return _PretrainedModel(self)

    @property
    def lm_params(self) -> dict:
        return lm_params(self.params)

    def get_parameter(self, name: str):
        """A weight by TRL's name (``"pretrained_model.transformer.h.0.attn.c_attn.weight"``,
        ``"v_head.summary.weight"``) or the plain HF name."""
        return self._weights()._get(name[len("pretrained_model."):] if name.startswith("pretrained_model.") else name)

    # -- PEFT ---------------------------------------------------------------------------------
    def compute_reward_score(self, input_ids, attention_mask=None, **kwargs) -> jax.Array:
        """TRL's multi-adapter reward: the base with the reward adapter (not the policy's) and
        its ``score`` head -> scores [batch, seq, num_labels] (float32) at every position (read
        the last real token's, as TRL's ``ppo_multi_adapter.py``). Jitted; the policy's params
        are an argument, so the one base serves policy, reference and reward."""
        if not self.supports_rm_adapter:
            raise ValueError("This model does not support reward modeling adapter. Load it with "
                             "from_pretrained(..., peft_config=..., reward_adapter=<adapter dir>).")
        ids, mask, _, _ = _prep_call(input_ids, attention_mask, None, None, None, kwargs)
        key = ("reward_score", self.module, self.reward_adapter_config)
        if key not in _FORWARDS:
            from rljax.models.peft import make_reward_adapter_scorer

            _FORWARDS[key] = (self.module, jax.jit(make_reward_adapter_scorer(self.module, self.reward_adapter_config)))
            while len(_FORWARDS) > 32:
                _FORWARDS.popitem(last=False)
        return _FORWARDS[key][1](self.params, self.reward_adapter_params, ids, mask)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """TRL's: a PEFT model writes its adapter files plus the value head alone
        (``model.safetensors``); otherwise the full HF checkpoint with ``v_head.*``."""
        if not self.is_peft_model:
            return super().save_pretrained(save_directory, **kwargs)
        from rljax.models.peft import PeftModel

        PeftModel(self.module, self.params, self.lora_config, base_model=self).save_pretrained(save_directory)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """HF tensor names -> arrays; a PEFT model's holds the value head only (TRL)."""
        if not self.is_peft_model:
            return super().state_dict()
        head = self.params["v_head"]["summary"]
        return {"v_head.summary.weight": np.asarray(head["kernel"]).T, "v_head.summary.bias": np.asarray(head["bias"])}

    def _lm_module(self):
        return self.module.lm

    def _lm_params(self):
        return lm_params(self.params)

    def _config_changed(self, new_config) -> None:
        lm = self.module.lm.clone(config=new_config)
        _check_same_shapes(lm, lm_params(self.params), "that field")
        self.module = self.module.clone(lm=lm)


# --------------------------------------------------------------------------------------------
# AutoModelForSequenceClassification
# --------------------------------------------------------------------------------------------


class AutoModelForSequenceClassification(AutoModelForCausalLM):
    """HF's ``AutoModelForSequenceClassification`` (reward models) over a ``SequenceScoreModel``.

    ``from_pretrained(path, num_labels=1)`` loads a ``*ForSequenceClassification`` checkpoint,
    or a causal-LM one with a fresh ``score`` head (N(0, initializer_range), as HF);
    ``model(input_ids, attention_mask=...)`` returns ``.logits`` [batch, num_labels] read at
    each row's last real token (left or right padding). No ``generate``.
    """

    def __init__(self, module: SequenceScoreModel, params: dict, *, config_extras: Optional[dict] = None, seed: int = 0):
        if not isinstance(module, SequenceScoreModel):
            raise ValueError(f"expected a SequenceScoreModel module, got {type(module).__name__}.")
        super().__init__(module, params, config_extras=config_extras, generation_config=GenerationConfig(), seed=seed)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, num_labels: Optional[int] = None,
                        dtype=None, torch_dtype=None, revision: Optional[str] = None, trust_remote_code: bool = False,
                        rng: Optional[jax.Array] = None, **kwargs) -> "AutoModelForSequenceClassification":
        """``num_labels``: None reads the checkpoint's labels (else HF's 2); reward models use 1.
        ``rng`` initialises a missing ``score`` head (default ``PRNGKey(0)``). Other arguments as
        ``AutoModelForCausalLM.from_pretrained``."""
        _check_load_kwargs(cls.__name__, model_args, kwargs)
        module, params = sequence_score_from_pretrained(
            pretrained_model_name_or_path, num_labels, dtype, rng=rng, torch_dtype=torch_dtype, revision=revision,
            trust_remote_code=trust_remote_code)
        return cls(module, params)

    @property
    def num_labels(self) -> int:
        return self.module.num_labels

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, rngs=None,
                 **kwargs):
        """input_ids [batch, seq] -> ``SequenceScoreOutput`` (``.logits`` [batch, num_labels] float32)."""
        ids, mask, pos, _ = _prep_call(input_ids, attention_mask, position_ids, None, None, kwargs)
        return _score_fn(self.module)(self.params, ids, mask, pos, rngs, deterministic=deterministic)

    def generate(self, *args, **kwargs):
        raise ValueError("A sequence-classification model has no language-model head to generate with.")

    def save_pretrained(self, save_directory: str, *, overwrite: bool = False, max_shard_size=None,
                        safe_serialization: bool = True) -> None:
        if not safe_serialization:
            raise ValueError("rljax writes safetensors only; drop safe_serialization=False.")
        _save_pretrained(self.module, self.params, save_directory, overwrite=overwrite,
                         max_shard_size=max_shard_size, extra_config=self.config.extras)


_SCORE_FNS: Dict[Any, Callable] = {}


def _score_fn(module) -> Callable:
    key = module
    if key not in _SCORE_FNS:
        def score(params, input_ids, attention_mask, position_ids, rngs, deterministic):
            return module.apply({"params": params}, input_ids, attention_mask, position_ids, deterministic, rngs=rngs)

        if len(_SCORE_FNS) > 16:
            _SCORE_FNS.clear()
        _SCORE_FNS[key] = jax.jit(score, static_argnames=("deterministic",))
    return _SCORE_FNS[key]


# --------------------------------------------------------------------------------------------
# Encoder-decoders: AutoModelForSeq2SeqLM and AutoModelForSeq2SeqLMWithValueHead (TRL)
# --------------------------------------------------------------------------------------------

NOT_A_SEQ2SEQ_LM = "The model is not an encoder-decoder language model (rljax: T5); use AutoModelForCausalLM(WithValueHead)."


@dataclasses.dataclass
class Seq2SeqLMOutputWithLoss(CausalLMOutputWithLoss):
    """HF's ``Seq2SeqLMOutput`` subset: ``loss`` (with ``labels``) or None, ``logits``
    [batch, dec_len, vocab] float32, ``hidden_states`` (decoder, last layer), ``cache``, and
    ``encoder_last_hidden_state`` [batch, enc_len, d_model]."""

    encoder_last_hidden_state: Optional[jax.Array] = None


_SEQ2SEQ_FORWARDS: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()


def _seq2seq_forward_fn(module) -> Callable:
    """One jitted ``(params, ids, mask, dec_ids, dec_mask, labels, rngs, deterministic) -> (out, loss)``
    per module; HF's seq2seq loss: cross-entropy of ``logits`` against ``labels`` (no shift, -100 ignored)."""
    if module in _SEQ2SEQ_FORWARDS:
        _SEQ2SEQ_FORWARDS.move_to_end(module)
        return _SEQ2SEQ_FORWARDS[module]

    def forward(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels, rngs,
                deterministic):
        out = module.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                           deterministic=deterministic, rngs=rngs)
        if labels is None:
            return out, None
        valid = labels != -100
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return out, jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)

    fn = jax.jit(forward, static_argnames=("deterministic",))
    _SEQ2SEQ_FORWARDS[module] = fn
    while len(_SEQ2SEQ_FORWARDS) > 32:
        _SEQ2SEQ_FORWARDS.popitem(last=False)
    return fn


def hf_seq2seq_generate(module, params, base_config: GenerationConfig, rng: jax.Array, input_ids,
                        attention_mask=None, generation_config=None, decoder_input_ids=None, **kwargs) -> jax.Array:
    """HF ``generate`` for an encoder-decoder: -> decoder sequences [batch * num_return_sequences,
    D + steps] starting with ``decoder_input_ids`` (default: the decoder start token alone, D = 1).
    As HF, ``max_length`` and ``min_length`` count the decoder tokens (start token included); the
    default is ``max_length=20``. Sampling and eos/pad settings as ``hf_generate``."""
    from rljax.models.seq2seq import seq2seq_generate

    start = kwargs.pop("decoder_start_token_id", None)
    s = _generation_settings(base_config, generation_config, kwargs)
    ids = _as_ids(input_ids, "input_ids")
    if ids is None or ids.ndim != 2:
        raise ValueError("generate() needs input_ids of shape [batch, src_len] (add a batch axis with ids[None]).")
    mask = jnp.ones_like(ids) if attention_mask is None else _as_ids(attention_mask, "attention_mask")
    cfg = module.config
    start = cfg.decoder_start_token_id if start is None else int(start)
    dec = _as_ids(decoder_input_ids, "decoder_input_ids")
    if dec is None:
        dec = jnp.full((ids.shape[0], 1), start, jnp.int32)
    D = dec.shape[1]
    eos = s["eos_token_id"]
    eos_list = [] if eos is None else ([int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos])
    pad = s["pad_token_id"] if s["pad_token_id"] is not None else (eos_list[0] if eos_list else None)
    max_new = s["max_new_tokens"]
    if max_new is None:
        max_new = int(s["max_length"] if s["max_length"] is not None else DEFAULT_NEW_TOKENS) - D
        if max_new < 1:
            raise ValueError(f"The decoder prefix ({D} tokens) already reaches max_length; pass max_new_tokens=...")
    min_new = max(int(s["min_new_tokens"] or 0), int(s["min_length"] or 0) - D)
    n_seq = int(s["num_return_sequences"])
    if n_seq > 1:
        if not s["do_sample"]:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy search returns one sequence).")
        ids, mask, dec = (jnp.repeat(x, n_seq, axis=0) for x in (ids, mask, dec))
    top_k = s["top_k"] if s["do_sample"] else 0
    out = seq2seq_generate(
        module, params, ids, mask, rng, max_new_tokens=int(max_new), do_sample=bool(s["do_sample"]),
        temperature=float(s["temperature"]) if s["do_sample"] else 1.0, top_k=0 if top_k is None else top_k,
        top_p=float(s["top_p"]) if s["do_sample"] else 1.0, min_new_tokens=int(min_new),
        eos_token_id=eos_list or None, pad_token_id=pad, decoder_input_ids=dec,
    )
    steps = int(jnp.max(jnp.sum(out.response_mask[:, D:], axis=-1))) if eos_list else int(max_new)
    return out.sequences[:, : D + steps]


class AutoModelForSeq2SeqLM(AutoModelForCausalLM):
    """HF's ``AutoModelForSeq2SeqLM`` (T5) as a shell over (``.module``, ``.params``).

    ``model(input_ids, attention_mask=..., decoder_input_ids=..., decoder_attention_mask=...,
    labels=...)`` returns ``.logits`` [batch, dec_len, vocab] (and HF's ``.loss`` with labels;
    without ``decoder_input_ids`` they are ``labels`` shifted right, as HF);
    ``generate(input_ids, ...)`` returns decoder sequences starting with the start token.
    """

    def __init__(self, module, params, *, config_extras: Optional[dict] = None,
                 generation_config: Optional[GenerationConfig] = None, seed: int = 0):
        if not getattr(module, "is_encoder_decoder", False):
            raise ValueError(f"{NOT_A_SEQ2SEQ_LM} (got a {type(module).__name__} module)")
        super().__init__(module, params, config_extras=config_extras, generation_config=generation_config, seed=seed)

    is_encoder_decoder = True

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 deterministic: bool = True, rngs=None, *, labels=None, past_key_values=None, **kwargs):
        """Jitted forward -> ``Seq2SeqLMOutputWithLoss`` (value-head models: TRL's
        ``(lm_logits, loss, value)``)."""
        if past_key_values is not None:
            raise ValueError("past_key_values is not supported: rljax's decoder cache is explicit (rljax.models.seq2seq).")
        for k in ("output_hidden_states", "return_dict", "use_cache"):
            kwargs.pop(k, None)
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)}; rljax seq2seq models take input_ids, "
                            "attention_mask, decoder_input_ids, decoder_attention_mask, labels, deterministic, rngs.")
        ids, mask = _as_ids(input_ids, "input_ids"), _as_ids(attention_mask, "attention_mask")
        if ids is None:
            raise ValueError("input_ids (the encoder input) is required.")
        mask = jnp.ones_like(ids) if mask is None else mask
        labels = _as_ids(labels, "labels")
        dec = _as_ids(decoder_input_ids, "decoder_input_ids")
        if dec is None:
            if labels is None:
                raise ValueError("Pass decoder_input_ids (starting with the decoder start token) or labels.")
            from rljax.models.t5 import shift_right

            cfg = self.module.config
            dec = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
        dmask = _as_ids(decoder_attention_mask, "decoder_attention_mask")
        out, loss = _seq2seq_forward_fn(self.module)(self.params, ids, mask, dec, dmask, labels, rngs,
                                                     deterministic=deterministic)
        return self._output(out, loss)

    def _output(self, out, loss):
        return Seq2SeqLMOutputWithLoss(loss, out.logits, out.hidden_states, out.cache, out.encoder_hidden_states)

    def generate(self, input_ids=None, attention_mask=None, *, generation_config=None, rng=None, inputs=None,
                 decoder_input_ids=None, **kwargs) -> jax.Array:
        """HF ``generate`` for encoder-decoders (see ``hf_seq2seq_generate``)."""
        return hf_seq2seq_generate(self._lm_module(), self._lm_params(), self.generation_config, self._next_rng(rng),
                                   input_ids if inputs is None else inputs, attention_mask, generation_config,
                                   decoder_input_ids=decoder_input_ids, **kwargs)


class _Seq2SeqPretrainedModel(_PretrainedModel, AutoModelForSeq2SeqLM):
    """``value_head_model.pretrained_model`` of a seq2seq value-head model."""

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        config_extras = {k: v for k, v in self.config.extras.items() if k != "summary_dropout_prob"}
        AutoModelForSeq2SeqLM(self.module, self.params, config_extras=config_extras,
                              generation_config=self.generation_config).save_pretrained(save_directory, **kwargs)


class AutoModelForSeq2SeqLMWithValueHead(AutoModelForSeq2SeqLM):
    """TRL's ``AutoModelForSeq2SeqLMWithValueHead`` over a ``Seq2SeqLMWithValueHead`` module:
    the value head reads the decoder's last hidden state. Calling it returns TRL's
    ``(lm_logits, loss, value)`` with value [batch, dec_len]; ``generate``, ``v_head``,
    ``pretrained_model``, ``state_dict()`` and ``save_pretrained`` as the causal one."""

    transformers_parent_class = AutoModelForSeq2SeqLM
    lm_head_namings = ["lm_head", "embed_out", "output_projection"]
    supported_args = AutoModelForCausalLMWithValueHead.supported_args

    def __init__(self, module, params: dict, *, config_extras: Optional[dict] = None,
                 generation_config: Optional[GenerationConfig] = None, seed: int = 0):
        from rljax.models.heads import Seq2SeqLMWithValueHead

        if not isinstance(module, Seq2SeqLMWithValueHead):
            raise ValueError(f"{NOT_A_SEQ2SEQ_LM} (expected a Seq2SeqLMWithValueHead module, got {type(module).__name__})")
        super().__init__(module, params, config_extras=config_extras, generation_config=generation_config, seed=seed)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, torch_dtype=None,
                        revision: Optional[str] = None, trust_remote_code: bool = False,
                        summary_dropout_prob: Optional[float] = None, v_head_init_strategy: Optional[str] = None,
                        v_head_initializer_range: float = 0.2, rng: Optional[jax.Array] = None,
                        **kwargs) -> "AutoModelForSeq2SeqLMWithValueHead":
        """From a T5 checkpoint directory / hub id, an ``AutoModelForSeq2SeqLM`` or an rljax
        ``(lm_module, lm_params)`` pair; value-head arguments as the causal one's."""
        _check_load_kwargs(cls.__name__, model_args, kwargs)
        vkw = dict(summary_dropout_prob=summary_dropout_prob, v_head_init_strategy=v_head_init_strategy,
                   v_head_initializer_range=v_head_initializer_range, rng=rng)
        return _value_head_model_from(cls, pretrained_model_name_or_path, NOT_A_SEQ2SEQ_LM, dtype, torch_dtype, revision,
                                      trust_remote_code, vkw)

    @classmethod
    def from_lm(cls, lm_module, params, *, dtype=None, summary_dropout_prob=None, v_head_init_strategy=None,
                v_head_initializer_range=0.2, rng=None) -> "AutoModelForSeq2SeqLMWithValueHead":
        """Wrap an rljax encoder-decoder LM (module, params); the value head is freshly initialised."""
        from rljax.models.heads import Seq2SeqLMWithValueHead

        if isinstance(lm_module, Seq2SeqLMWithValueHead):
            return cls(lm_module, params)
        if not getattr(lm_module, "is_encoder_decoder", False) or isinstance(lm_module, CausalLMWithValueHead):
            raise ValueError(f"{NOT_A_SEQ2SEQ_LM} Got a {type(lm_module).__name__}.")
        dtype = as_jax_dtype(dtype)
        if dtype is not None:
            lm_module = lm_module.clone(dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        module = Seq2SeqLMWithValueHead(lm_module, 0.1 if summary_dropout_prob is None else summary_dropout_prob,
                                        v_head_init_strategy, v_head_initializer_range)
        head = init_value_head(module, jax.random.PRNGKey(0) if rng is None else rng)
        return cls(module, {**params, **head})

    def _output(self, out, loss):
        return ValueHeadModelOutput(out.logits, loss, out.values, out.hidden_states, out.cache)

    @property
    def pretrained_model(self) -> _Seq2SeqPretrainedModel:
        """The wrapped LM (an ``AutoModelForSeq2SeqLM`` sharing these params)."""
        return _Seq2SeqPretrainedModel(self)

    v_head = AutoModelForCausalLMWithValueHead.v_head
    lm_params = AutoModelForCausalLMWithValueHead.lm_params
    get_parameter = AutoModelForCausalLMWithValueHead.get_parameter
    _lm_module = AutoModelForCausalLMWithValueHead._lm_module
    _lm_params = AutoModelForCausalLMWithValueHead._lm_params
    _config_changed = AutoModelForCausalLMWithValueHead._config_changed


__all__ = [
    "AutoModelForCausalLM",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSeq2SeqLMWithValueHead",
    "Seq2SeqLMOutputWithLoss",
    "hf_seq2seq_generate",
    "AutoModelForSequenceClassification",
    "CausalLMOutputWithLoss",
    "GenerationConfig",
    "HFConfig",
    "ValueHeadModelOutput",
    "WeightsView",
    "hf_generate",
]
