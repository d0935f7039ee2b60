"""Pieces shared by every causal LM family: outputs, the KV cache, masked attention.

The cache is an explicit pytree passed in and returned (no flax mutable
collections), so generation is a pure function of (params, cache, tokens).

Cache layout (one entry per layer)::

    {"layers": [{"k": [batch, kv_heads, max_len, head_dim],
                 "v": [batch, kv_heads, max_len, head_dim]}, ...],
     "index": int32 scalar}   # next free slot, the same for every row

Heads-major, as HF's ``past_key_values``: a decode step's attention reads each head's slots as
one contiguous block (a [batch, max_len, heads, ...] cache would be transposed in full, every
layer, every token: a fifth of GPT-2-small's generation time on CPU).

With a cache, the model's ``attention_mask`` is ``[batch, max_len]`` over the
cache slots (1 = slot holds a real token); a query written at slot ``s`` sees
slots ``<= s`` whose mask is 1. Without a cache it is ``[batch, seq]``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = dict


@flax.struct.dataclass
class CausalLMOutput:
    """Model output. ``logits``: [batch, seq, vocab] ([batch, length, vocab] under a
    ``logits_window``); ``hidden_states``: the last layer's (after the final norm), [batch, seq,
    hidden]; ``cache``: updated KV cache or None."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: Optional[Any] = None


def init_cache(
    num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> Cache:
    """Allocate an empty KV cache (see module docstring for the layout)."""
    shape = (batch_size, num_kv_heads, max_length, head_dim)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]
    return {"layers": layers, "index": jnp.array(0, jnp.int32)}


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """``cumsum(mask) - 1`` clipped at 0: left-padded rows start at position 0. [batch, seq]."""
    return jnp.clip(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def attention_bias(
    attention_mask: jax.Array, q_len: int, offset, dtype, sliding_window: Optional[int] = None
) -> jax.Array:
    """Additive bias [batch, 1, q_len, kv_len]: causal (query i sits at slot offset+i)
    and key padding. Fully masked rows get a finite large negative, never NaN.

    ``sliding_window`` (Mistral/Qwen2): a query at slot q also needs ``q - k < sliding_window``.
    Slots are contiguous per row (padding only on the left), so slot distance is token distance.
    """
    kv_len = attention_mask.shape[-1]
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    causal = k_pos <= q_pos
    if sliding_window is not None:
        causal = causal & (q_pos - k_pos < sliding_window)
    allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def update_layer_cache(layer_cache: dict, k: jax.Array, v: jax.Array, index, heads_major: bool = False) -> dict:
    """Write k, v ([batch, seq, kv_heads, head_dim]) at slot ``index`` of the layer cache:
    ``[batch, kv_heads, max_len, head_dim]`` with ``heads_major`` (the causal LMs' cache), else
    ``[batch, max_len, kv_heads, head_dim]`` (T5's)."""
    if heads_major:
        k, v, at = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), (0, 0, index, 0)
    else:
        at = (0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), at)
    v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), at)
    return {"k": k_all, "v": v_all}


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    head_bias: Optional[jax.Array] = None,
    kv_heads_major: bool = False,
) -> jax.Array:
    """Softmax attention with grouped KV heads (query head i reads KV head i // (heads // kv_heads),
    as HF's ``repeat_kv`` does).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    bias: [batch, 1, q_len, kv_len]. Returns [batch, q_len, heads, head_dim].
    Softmax runs in float32 whatever the parameter dtype. With a ``dropout_rng`` (training) and
    ``dropout_rate`` > 0, the attention probabilities are dropped and rescaled by
    1 / (1 - rate), as HF's ``attn_dropout`` does; without one, nothing is dropped.
    ``scale``: the factor on q.k (None: 1 / sqrt(head_dim); GPT-Neo uses 1.0).
    ``head_bias``: [batch, heads, kv_len] added to every query's scores (Bloom's ALiBi), or None.
    ``kv_heads_major``: k, v are [batch, kv_heads, kv_len, head_dim] (the KV cache's layout).
    """
    b, q_len, h, d = q.shape
    kv_heads = k.shape[1] if kv_heads_major else k.shape[2]
    kv = "bhkd" if kv_heads_major else "bkhd"
    if h % kv_heads:
        raise ValueError(f"{h} query heads cannot be grouped over {kv_heads} key/value heads.")
    groups = h // kv_heads
    q = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum(f"bqhgd,{kv}->bhgqk", q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(d).astype(jnp.float32) if scale is None else scores * jnp.float32(scale)
    if head_bias is not None:
        scores = scores + head_bias.astype(jnp.float32).reshape(b, kv_heads, groups, 1, -1)
    scores = scores + bias[:, :, None].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(v.dtype)
    out = jnp.einsum(f"bhgqk,{kv}->bqhgd", probs, v)
    return out.reshape(b, q_len, h, d)


def attend(
    q, k, v, attention_mask, layer_cache, cache_index, sliding_window: Optional[int] = None,
    dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None, scale: Optional[float] = None,
    head_bias: Optional[jax.Array] = None,
):
    """Attention for one layer, with or without a cache. Returns (out, new_layer_cache).
    ``dropout_rate``/``dropout_rng``/``scale``/``head_bias``: see ``dot_product_attention``."""
    q_len = q.shape[1]
    if layer_cache is None:
        bias = attention_bias(attention_mask, q_len, 0, jnp.float32, sliding_window)
        return dot_product_attention(q, k, v, bias, dropout_rate, dropout_rng, scale, head_bias), None
    new_cache = update_layer_cache(layer_cache, k, v, cache_index, heads_major=True)
    bias = attention_bias(attention_mask, q_len, cache_index, jnp.float32, sliding_window)
    out = dot_product_attention(q, new_cache["k"], new_cache["v"], bias, dropout_rate, dropout_rng, scale, head_bias,
                                kv_heads_major=True)
    return out, new_cache


def cache_mask_shape(cache) -> tuple:
    """(batch, max_length) of a KV cache (a list of layers, or one layer-stacked entry)."""
    layers = cache["layers"]
    shape = layers["k"].shape[1:] if isinstance(layers, dict) else layers[0]["k"].shape  # [batch, heads, slots, d]
    return (shape[0], shape[2])


def check_inputs(input_ids, attention_mask, position_ids, cache) -> None:
    """Shape/dtype checks shared by every family (run at trace time)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}; add a batch axis with x[None].")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is not None:
        expected = input_ids.shape if cache is None else cache_mask_shape(cache)
        if tuple(attention_mask.shape) != tuple(expected):
            what = "[batch, seq] like input_ids" if cache is None else "[batch, cache_length] over the cache slots"
            raise ValueError(f"attention_mask must be {what} = {tuple(expected)}, got {tuple(attention_mask.shape)}.")
    if position_ids is not None and tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"position_ids must match input_ids {input_ids.shape}, got {position_ids.shape}.")


def prepare_inputs(input_ids, attention_mask, position_ids, cache):
    """Check inputs and fill defaults: an all-ones mask, and ``cumsum(mask) - 1`` positions
    (sliced at the cache index when decoding). Returns (attention_mask, position_ids)."""
    check_inputs(input_ids, attention_mask, position_ids, cache)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape if cache is None else cache_mask_shape(cache), jnp.int32)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
        if cache is not None:
            position_ids = jax.lax.dynamic_slice_in_dim(position_ids, cache["index"], input_ids.shape[1], 1)
    return attention_mask, position_ids


LogitsWindow = Optional[Tuple[int, int]]


def window_positions(x: jax.Array, logits_window: LogitsWindow) -> jax.Array:
    """``x`` [batch, seq, ...] cut to the static ``logits_window = (start, length)`` columns
    (None: all of them). A negative ``start`` counts from the end (``(-1, 1)``: the last column)."""
    if logits_window is None:
        return x
    start, length = (int(v) for v in logits_window)
    seq = x.shape[1]
    start = start + seq if start < 0 else start
    if length < 1 or start < 0 or start + length > seq:
        raise ValueError(
            f"logits_window={tuple(logits_window)} must select 1 or more of the {seq} positions: "
            "(start, length) with 0 <= start (or -seq <= start < 0) and start + length <= seq."
        )
    return x[:, start : start + length]


def supports_logits_window(module: Any) -> bool:
    """Whether ``module.__call__`` takes ``logits_window`` (every ``CausalLM`` and the value
    head over one do; a wrapper that does not is still usable: see ``apply_windowed``)."""
    try:
        return "logits_window" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False


def apply_windowed(module: Any, variables: Any, *args: Any, logits_window: LogitsWindow = None, **kwargs: Any):
    """``module.apply(variables, *args, **kwargs)`` whose ``.logits`` (and ``.values``, if any)
    cover only the ``logits_window`` columns: the head runs there alone when the module supports
    it, otherwise the full output is sliced (same numbers, full cost)."""
    if logits_window is None:
        return module.apply(variables, *args, **kwargs)
    if supports_logits_window(module):
        return module.apply(variables, *args, logits_window=logits_window, **kwargs)
    out = module.apply(variables, *args, **kwargs)
    changes = {"logits": window_positions(out.logits, logits_window)}
    if getattr(out, "values", None) is not None and not callable(out.values):
        changes["values"] = window_positions(out.values, logits_window)
    return out.replace(**changes)


class CausalLM(nn.Module):
    """What every family's causal LM shares: checked inputs with default mask/positions, the
    trunk (``trunk_cls`` named ``trunk_name``, returning ``(hidden, cache, embedding)``), then a
    tied or untied ``lm_head``. ``__call__(input_ids [batch, seq], attention_mask=None,
    position_ids=None, cache=None, deterministic=True, logits_window=None) -> CausalLMOutput``.

    ``logits_window = (start, length)`` (static ints): the LM head runs on those columns only,
    so ``logits`` is [batch, length, vocab] (generation's prefill needs the last column, PPO the
    response window); ``hidden_states`` stays [batch, seq, hidden]. None: every column."""

    config: Any
    dtype: Any = jnp.float32
    trunk_cls: ClassVar[Any] = None
    trunk_name: ClassVar[str] = ""
    # Learned position embeddings (GPT-2) cannot go past max_position_embeddings; RoPE can.
    positions_are_hard_limit: ClassVar[bool] = False
    # An untied output projection with a bias (GPT-J, CodeGen).
    lm_head_bias: ClassVar[bool] = False
    # The untied output projection's HF name ("embed_out" in GPT-NeoX checkpoints).
    lm_head_name: ClassVar[str] = "lm_head"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        cache: Optional[dict] = None,
        deterministic: bool = True,
        logits_window: LogitsWindow = None,
    ) -> CausalLMOutput:
        attention_mask, position_ids = prepare_inputs(input_ids, attention_mask, position_ids, cache)
        hidden, new_cache, embed = self.trunk_cls(self.config, self.dtype, name=self.trunk_name)(
            input_ids, attention_mask, position_ids, cache, deterministic
        )
        head_in = window_positions(hidden, logits_window)
        if self.config.tie_word_embeddings:
            logits = embed.attend(head_in)
        else:
            logits = nn.Dense(self.config.vocab_size, use_bias=self.lm_head_bias, dtype=self.dtype,
                              name=self.lm_head_name)(head_in)
        return CausalLMOutput(logits=logits.astype(jnp.float32), hidden_states=hidden, cache=new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache for ``batch_size`` rows and ``max_length`` slots."""
        cfg = self.config
        if self.positions_are_hard_limit and max_length > cfg.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's {cfg.max_position_embeddings} positions; "
                "shorten the prompt or max_new_tokens."
            )
        make = init_stacked_cache if getattr(cfg, "scan_layers", False) else init_cache
        return make(
            cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype or self.dtype
        )


# --- the layer stack: per-layer remat and scanned layers -----------------------------------
#
# Every family's config carries two options (not written to config.json):
#   remat_policy: "none" | "full" | "dots"   rematerialise each block in the backward pass
#                 ("full": keep only the block's input; "dots": also keep matmul outputs
#                 without batch dims, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
#   scan_layers:  run the blocks as one nn.scan: params stacked on a leading layer axis under
#                 the plain name (``h``/``layers``), KV cache stacked the same way, so the
#                 compiled program holds one block whatever the depth.
# HF names stay one-to-one on disk: rljax.models.hub expands a stacked ``h/...`` leaf of shape
# [L, ...] into ``h.0. ... h.{L-1}.`` tensors on save, and stacks them on load.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LAYER_OPTION_FIELDS = ("remat_policy", "scan_layers")
SCANNED_LAYER_NAMES = ("h", "layers")  # the module names of the stack (per layer: h_0, layers_0, ...)


def check_layer_options(remat_policy: str, scan_layers: bool) -> None:
    """Raise a ValueError naming the argument when a layer option is invalid."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}.")
    if not isinstance(scan_layers, bool):
        raise ValueError(f"scan_layers must be a bool, got {scan_layers!r}.")


def drop_layer_options(d: dict) -> dict:
    """A config dict without the rljax-only layer options (for config.json). Mutates and returns ``d``."""
    for k in LAYER_OPTION_FIELDS:
        d.pop(k, None)
    return d


def supports_layer_options(module: Any) -> bool:
    """Whether ``module`` (or the LM a head wraps as ``.lm``) reads remat_policy/scan_layers."""
    module = getattr(module, "lm", module)
    cfg = getattr(module, "config", None)
    return dataclasses.is_dataclass(cfg) and all(f in {x.name for x in dataclasses.fields(cfg)}
                                                 for f in LAYER_OPTION_FIELDS)


def with_layer_options(module: Any, remat_policy: Optional[str] = None, scan_layers: Optional[bool] = None) -> Any:
    """``module`` (a causal LM, or a head wrapping one as ``.lm``) with its config's layer options
    replaced (None keeps the current value). Changing ``scan_layers`` changes the params layout:
    convert them with ``stack_layer_params`` / ``unstack_layer_params``."""
    if hasattr(module, "lm"):
        return module.clone(lm=with_layer_options(module.lm, remat_policy, scan_layers))
    cfg = module.config
    if not supports_layer_options(module):
        raise ValueError(f"{type(cfg).__name__} has no remat_policy/scan_layers options; "
                         "per-layer remat and scanned layers need an rljax causal-LM family.")
    changes = {k: v for k, v in (("remat_policy", remat_policy), ("scan_layers", scan_layers)) if v is not None}
    check_layer_options(changes.get("remat_policy", cfg.remat_policy), changes.get("scan_layers", cfg.scan_layers))
    return module.clone(config=dataclasses.replace(cfg, **changes))


def block_class(cls: Any, config: Any, num_args: int, scanned: bool = False) -> Any:
    """``cls`` wrapped in ``nn.remat`` with the config's ``remat_policy`` (``cls`` itself for "none").

    The block is called ``(x, *args, layer_cache, cache_index, deterministic)`` with ``num_args``
    extra ``args``; ``deterministic`` is static. ``prevent_cse`` is off inside a scan, where
    JAX's scan already keeps the recomputation from being merged away."""
    policy_name = getattr(config, "remat_policy", "none")
    if policy_name == "none":
        return cls
    deterministic_argnum = num_args + 4  # self, x, *args, layer_cache, cache_index, deterministic
    return nn.remat(cls, policy=REMAT_POLICIES[policy_name], prevent_cse=not scanned,
                    static_argnums=(deterministic_argnum,))


def run_layers(
    block_cls: Any,
    config: Any,
    dtype: Any,
    name: str,
    x: jax.Array,
    args: tuple,
    cache: Optional[dict],
    deterministic: bool,
    layer_kwargs: Optional[Any] = None,
):
    """Run ``config.num_hidden_layers`` blocks over ``x`` [batch, seq, hidden] inside the caller's
    ``nn.compact`` method. Returns ``(x, new_cache)``; ``new_cache`` is None without a cache.

    Each block is ``block_cls(config, dtype=dtype, name=..., **layer_kwargs(i))`` called as
    ``(x, *args, layer_cache, cache_index, deterministic) -> (x, new_layer_cache)``; ``args`` are
    the same for every layer (mask, RoPE tables, ...). Unscanned: blocks ``{name}_{i}`` and a list
    of per-layer caches. ``config.scan_layers``: one ``nn.scan`` block ``name`` with params and
    cache stacked on a leading layer axis (every layer's ``layer_kwargs`` must be equal).
    """
    check_layer_options(getattr(config, "remat_policy", "none"), getattr(config, "scan_layers", False))
    n = config.num_hidden_layers
    kw_of = layer_kwargs or (lambda i: {})
    index = None if cache is None else cache["index"]
    scan = getattr(config, "scan_layers", False)
    cls = block_class(block_cls, config, len(args), scanned=scan)
    if not scan:
        new_layers = []
        for i in range(n):
            layer_cache = None if cache is None else cache["layers"][i]
            x, lc = cls(config, dtype=dtype, name=f"{name}_{i}", **kw_of(i))(
                x, *args, layer_cache, index, deterministic)
            new_layers.append(lc)
    else:
        kws = [kw_of(i) for i in range(n)]
        if any(k != kws[0] for k in kws[1:]):
            raise ValueError(
                f"scan_layers=True needs identical layers, but {type(config).__name__} gives layers different "
                f"settings ({kws[0]} vs {next(k for k in kws if k != kws[0])}, e.g. mixed local/sliding and "
                "global attention); load the model with scan_layers=False.")
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args) + (0, nn.broadcast, nn.broadcast),
            length=n,
        )
        layer_cache = None if cache is None else cache["layers"]
        x, new_layers = scanned(config, dtype=dtype, name=name, **kws[0])(x, *args, layer_cache, index, deterministic)
    new_cache = None if cache is None else {"layers": new_layers, "index": index + x.shape[1]}
    return x, new_cache


def init_stacked_cache(
    num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> Cache:
    """An empty KV cache for a scanned model: ``{"layers": {"k": [layers, batch, kv_heads, max_len,
    head_dim], "v": ...}, "index": 0}`` (one stacked entry instead of a list of layers)."""
    shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
    return {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, "index": jnp.array(0, jnp.int32)}


def _layer_key(key: str) -> Optional[Tuple[str, int]]:
    import re

    m = re.fullmatch(r"(h|layers)_(\d+)", key)
    return (m.group(1), int(m.group(2))) if m else None


def stack_layer_params(params: Any) -> Any:
    """Per-layer params (``h_0 ... h_{L-1}``) -> the scanned layout (``h`` with every leaf
    stacked on a new leading axis). Works on any nesting (value/score heads included)."""
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params
    out, groups = {}, {}
    for k, v in params.items():
        lk = _layer_key(k)
        if lk is None:
            out[k] = stack_layer_params(v)
        else:
            groups.setdefault(lk[0], {})[lk[1]] = v
    for base, layers in groups.items():
        ordered = [layers[i] for i in range(len(layers))]
        out[base] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ordered)
    return out


def unstack_layer_params(params: Any) -> Any:
    """The scanned layout (``h`` with a leading layer axis) -> per-layer params ``h_0 ...``;
    the inverse of ``stack_layer_params``."""
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params
    out = {}
    for k, v in params.items():
        if k in SCANNED_LAYER_NAMES and hasattr(v, "items"):
            n = jax.tree_util.tree_leaves(v)[0].shape[0]
            for i in range(n):
                out[f"{k}_{i}"] = jax.tree_util.tree_map(lambda x: x[i], v)
        else:
            out[k] = unstack_layer_params(v)
    return out
