"""LoRA adapters in Hugging Face PEFT's format (TRL: ``peft_config=``, ``get_peft_model``).

Params: the adapters live INSIDE the base params tree, beside the kernel they adapt::

    .../attn/c_attn/{"kernel": [in, out], "bias": [out], "lora_A": [in, r], "lora_B": [r, out]}

so a scanned layer stack (params stacked on a leading layer axis) stacks its adapters too, and
sharding, checkpointing and ``jax.jit`` see one tree. :func:`trainable_mask` says which leaves
train (``lora_A``/``lora_B``, the value head, ``modules_to_save``, biases per ``bias=``); the
trainers differentiate only those and keep optimizer state only for them.

Module: :class:`LoraModel` wraps any rljax model (a causal LM, a value-head or score model) and
shares its params scope. A Flax method interceptor on every ``nn.Dense`` adds the adapter as a
side path, ``y = x W + b + dropout(x) A B * lora_alpha / r`` (PEFT's LoRA forward; with
``use_rslora``: ``lora_alpha / sqrt(r)``), dequantizes a quantized kernel
(``rljax.models.quant``) right before its matmul, and applies ``stop_gradient`` to the frozen
base's kernels and embeddings, so a backward pass never computes their weight gradients.
``adapters_enabled=False`` runs the same params with the adapters off: TRL's PEFT reference
model (``ppo_trainer.optional_peft_ctx`` / DPO's ``null_ref_context``), no second copy.

Files: :meth:`PeftModel.save_pretrained` writes PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<HF module>.lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``;
``modules_to_save`` as ``<module>.modules_to_save.weight``), which ``peft.PeftModel`` loads onto
the transformers model, and :meth:`PeftModel.from_pretrained` loads adapters PEFT wrote.

Differences from PEFT (documented, deliberate): LoRA on linear layers only (no Embedding/Conv
LoRA, no DoRA, no ``rank_pattern``/``alpha_pattern``/``layers_to_transform``: a ValueError
names them); ``modules_to_save`` train the module in place (PEFT keeps an untouched copy that
``disable_adapter`` restores; here ``adapters_enabled=False`` turns off the LoRA deltas only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.models.quant import is_quantized

__all__ = [
    "LoraConfig",
    "TaskType",
    "DEFAULT_TARGET_MODULES",
    "LoraModel",
    "PeftModel",
    "get_peft_model",
    "inject_adapters",
    "trainable_mask",
    "split_trainable",
    "merge_trainable",
    "merge_adapters",
    "strip_adapters",
    "with_adapters_enabled",
    "is_peft_module",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "adapter_leaves",
    "with_adapter",
    "load_reward_adapter",
    "make_reward_adapter_scorer",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_LEAVES = ("lora_A", "lora_B")
PEFT_PREFIX = "base_model.model."

#: PEFT's default ``target_modules`` per ``model_type`` (its
#: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, for the families rljax has).
DEFAULT_TARGET_MODULES: Dict[str, Tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "bloom": ("query_key_value",),
    "codegen": ("qkv_proj",),
    "t5": ("q", "v"),
}


class TaskType:
    """PEFT's task types (strings, as PEFT's enum values)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"


def _as_tuple(x: Any) -> Any:
    if x is None or isinstance(x, str):
        return x
    return tuple(x)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's ``LoraConfig`` fields and defaults (those rljax implements; the rest raise).

    ``r`` rank; ``lora_alpha`` (scaling ``lora_alpha / r``, or ``/ sqrt(r)`` with
    ``use_rslora``); ``lora_dropout`` on the adapter's input in training; ``target_modules``:
    module names matched as PEFT does (a list: a module whose HF name equals an entry or ends
    with ``"." + entry``; a string: a regex full-matching the HF name; None: the family's
    default, e.g. GPT-2 ``c_attn``, Llama ``q_proj``/``v_proj``); ``bias``: "none" | "all" |
    "lora_only" (which biases train); ``modules_to_save``: modules trained fully (SEQ_CLS adds
    ``score``); ``fan_in_fan_out``: PEFT's flag for Conv1D weights (GPT-2), recorded in the
    file; rljax kernels are ``[in, out]`` in every family, so it changes nothing here;
    ``init_lora_weights``: True = PEFT's init (A kaiming-uniform, B zeros: the adapter starts
    as a no-op), False = both random.
    """

    r: int = 8
    target_modules: Optional[Union[Tuple[str, ...], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[Tuple[str, ...]] = None
    init_lora_weights: bool = True
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: Any = None
    alpha_pattern: Any = None
    use_dora: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", _as_tuple(self.modules_to_save))
        if str(getattr(self.task_type, "value", self.task_type)) != str(self.task_type):
            object.__setattr__(self, "task_type", self.task_type.value)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive int (the adapter rank), got {self.r!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        for name in ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                raise ValueError(f"LoraConfig.{name} is not supported by rljax; leave it unset (one rank for all).")
            object.__setattr__(self, name, None)  # PEFT's files write {} / []: keep the config hashable
        if self.use_dora:
            raise ValueError("LoraConfig.use_dora=True (DoRA) is not supported by rljax; pass use_dora=False.")
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r}: rljax supports True (PEFT's default) or False."
            )
        if str(self.peft_type).split(".")[-1].upper() != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r}: rljax implements LoRA adapters only.")

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_any(cls, config: Any) -> "LoraConfig":
        """A LoraConfig from itself, a dict, or a PEFT ``LoraConfig`` object (same field names)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            src = config
        elif hasattr(config, "r") and hasattr(config, "lora_alpha"):
            src = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
            if getattr(config, "peft_type", None) is not None:
                src["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
            if isinstance(src.get("target_modules"), (set, frozenset)):
                src["target_modules"] = tuple(sorted(src["target_modules"]))
        else:
            raise ValueError(
                f"peft_config must be a LoraConfig (rljax.models.peft or peft's), got {type(config).__name__}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in src.items() if k in names}
        if "task_type" in kw and kw["task_type"] is not None:
            kw["task_type"] = str(getattr(kw["task_type"], "value", kw["task_type"]))
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        """``adapter_config.json`` as PEFT writes it."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        d["rank_pattern"] = self.rank_pattern or {}
        d["alpha_pattern"] = self.alpha_pattern or {}
        d.update(revision=None, auto_mapping=None, lora_bias=False, exclude_modules=None)
        return d

    def resolved_targets(self, model_type: str) -> Union[Tuple[str, ...], str]:
        if self.target_modules is not None:
            return self.target_modules
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"LoraConfig.target_modules is None and rljax has no default for model_type {model_type!r}; "
                "pass target_modules=[...] (module names such as 'q_proj')."
            )
        return DEFAULT_TARGET_MODULES[model_type]

    def resolved_modules_to_save(self) -> Tuple[str, ...]:
        extra = ("score", "classifier") if self.task_type == TaskType.SEQ_CLS else ()
        return tuple(dict.fromkeys(tuple(self.modules_to_save or ()) + extra))


# --------------------------------------------------------------------------------------------
# Names: flax paths -> HF module names
# --------------------------------------------------------------------------------------------


def _module_name(path: Tuple[str, ...]) -> str:
    """HF module name of a flax module path (``("transformer", "h_0", "attn")`` ->
    ``transformer.h.0.attn``)."""
    from rljax.models.hub import hf_name

    return hf_name(tuple(path) + ("bias",))[: -len(".bias")] if path else ""


def _matches(name: str, targets: Union[Tuple[str, ...], str]) -> bool:
    """PEFT's target matching on an HF module name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _in_modules(path: Tuple[str, ...], names: Sequence[str]) -> bool:
    """Whether a flax module path lies inside a module named (or HF-named) one of ``names``."""
    if not names:
        return False
    full = _module_name(tuple(path))
    return any(p in names for p in path) or any(full == n or full.startswith(n + ".") or
                                                 ("." + n + ".") in ("." + full + ".") for n in names)


def _dense_scopes(params: Any) -> List[Tuple[str, ...]]:
    """Paths of the dicts holding a matrix ``kernel`` (Dense layers) in a params tree."""
    out = []

    def visit(node, path):
        if isinstance(node, dict):
            k = node.get("kernel")
            if k is not None and (is_quantized(k) or getattr(k, "ndim", 0) >= 2):
                out.append(path)
            for key, child in node.items():
                if isinstance(child, dict):
                    visit(child, path + (key,))

    visit(dict(params), ())
    return out


def _kernel_in_out(kernel: Any) -> Tuple[Tuple[int, ...], int, int]:
    shape = tuple(kernel.shape)
    return shape[:-2], shape[-2], shape[-1]


# --------------------------------------------------------------------------------------------
# Params: inject, mask, merge
# --------------------------------------------------------------------------------------------


def inject_adapters(params: Any, config: LoraConfig, model_type: str, rng: jax.Array,
                    dtype: Any = jnp.float32) -> Any:
    """``params`` plus fresh ``lora_A`` ``[..., in, r]`` / ``lora_B`` ``[..., r, out]`` in every
    targeted Dense scope (PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) i.e. U(+-1/sqrt(in)), B = 0;
    ``init_lora_weights=False``: B ~ U(+-1/sqrt(r)) too). Adapters are float32 by default
    (PEFT keeps them in float32 over a low-precision base). Raises if nothing matched."""
    targets = config.resolved_targets(model_type)
    flat = flatten_dict(dict(params), is_leaf=lambda k, x: is_quantized(x))
    scopes = [p for p in _dense_scopes(params) if _matches(_module_name(p), targets)]
    if not scopes:
        names = sorted({_module_name(p).split(".")[-1] for p in _dense_scopes(params)})
        raise ValueError(
            f"LoraConfig.target_modules={targets!r} matches no linear layer of this {model_type} model; "
            f"its linear layers are named {names}."
        )
    for i, scope in enumerate(scopes):
        lead, d_in, d_out = _kernel_in_out(flat[scope + ("kernel",)])
        ka, kb = jax.random.split(jax.random.fold_in(rng, i))
        a = jax.random.uniform(ka, lead + (d_in, config.r), jnp.float32, -1.0, 1.0) / math.sqrt(d_in)
        if config.init_lora_weights:
            b = jnp.zeros(lead + (config.r, d_out), jnp.float32)
        else:
            b = jax.random.uniform(kb, lead + (config.r, d_out), jnp.float32, -1.0, 1.0) / math.sqrt(config.r)
        flat[scope + ("lora_A",)] = a.astype(dtype)
        flat[scope + ("lora_B",)] = b.astype(dtype)
    return unflatten_dict(flat)


def _leaf_paths(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in p), params
    )


def trainable_mask(params: Any, config: Optional[LoraConfig] = None,
                   extra_trainable: Sequence[str] = ("v_head",)) -> Any:
    """Bool pytree like ``params``: True for what trains under LoRA: the adapters, the
    top-level modules in ``extra_trainable`` (TRL's value head), the config's
    ``modules_to_save`` (SEQ_CLS: ``score``) and the biases ``bias=`` selects. With
    ``inference_mode`` (PEFT: an adapter loaded with ``is_trainable=False``) only
    ``extra_trainable`` trains."""
    config = config or LoraConfig()
    if config.inference_mode:
        return jax.tree_util.tree_map(lambda path: path[0] in extra_trainable, _leaf_paths(params),
                                      is_leaf=lambda x: isinstance(x, tuple))
    save = config.resolved_modules_to_save()
    lora_scopes = {p for p in _dense_scopes(params) if "lora_A" in _get(params, p)}

    def pick(path: Tuple[str, ...]) -> bool:
        if path[-1] in LORA_LEAVES:
            return True
        if path[0] in extra_trainable or _in_modules(path[:-1], save):
            return True
        if path[-1] == "bias" and (config.bias == "all" or (config.bias == "lora_only" and path[:-1] in lora_scopes)):
            return True
        return False

    # Leaves of a quantized kernel (codes, scale) are frozen base weights.
    return jax.tree_util.tree_map(pick, _leaf_paths(params), is_leaf=lambda x: isinstance(x, tuple))


def _get(tree: Any, path: Tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def split_trainable(params: Any, mask: Any) -> Tuple[Any, Any]:
    """``(trainable, frozen)``: two trees like ``params`` with None where the other one holds
    the leaf (None is an empty pytree, so ``jax.grad`` over ``trainable`` sees the adapters only)."""
    trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_trainable`."""
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def strip_adapters(params: Any) -> Any:
    """``params`` without the ``lora_A``/``lora_B`` leaves (the base model's params)."""
    flat = flatten_dict(dict(params), is_leaf=lambda k, x: is_quantized(x))
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in LORA_LEAVES})


def merge_adapters(params: Any, config: LoraConfig, dtype: Any = None) -> Any:
    """PEFT's ``merge_and_unload`` on a params tree: ``kernel += lora_A @ lora_B * scaling`` in
    every adapted layer (a quantized kernel is dequantized first), adapters removed."""
    from rljax.models.quant import dequantize_params

    flat = flatten_dict(dict(params), is_leaf=lambda k, x: is_quantized(x))
    out = {}
    for path, v in flat.items():
        if path[-1] in LORA_LEAVES:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in flat:
            a, b = flat[path[:-1] + ("lora_A",)], flat[path[:-1] + ("lora_B",)]
            w = v.dequantize() if is_quantized(v) else v
            delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * config.scaling
            v = (w.astype(jnp.float32) + delta).astype(w.dtype)
        out[path] = v
    merged = unflatten_dict(out)
    return dequantize_params(merged, dtype)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def _deterministic(module: Any, args: tuple, kwargs: dict) -> bool:
    try:
        bound = inspect.signature(type(module).__call__).bind(None, *args, **kwargs)
    except TypeError:
        return bool(kwargs.get("deterministic", True))
    return bool(bound.arguments.get("deterministic", True))


class LoraModel(nn.Module):
    """Any rljax model with LoRA adapters (and/or a quantized frozen base); see the module
    docstring. Same call contract and params layout as ``lm`` (plus the adapter leaves).

    ``scaling``: ``lora_alpha / r``; ``lora_dropout``: dropout on the adapter input when
    ``deterministic=False``; ``adapters_enabled``: False = the base model (PEFT's
    ``disable_adapter``); ``trainable_modules``: module names NOT frozen by ``stop_gradient``
    (``modules_to_save``); ``freeze_base``: stop gradients into the base's kernels/embeddings.
    """

    base_module: nn.Module
    scaling: float = 1.0
    lora_dropout: float = 0.0
    adapters_enabled: bool = True
    trainable_modules: Tuple[str, ...] = ()
    freeze_base: bool = True

    def setup(self):
        nn.share_scope(self, self.base_module)

    def clone(self, **updates: Any) -> "LoraModel":
        """flax's ``clone``; a ``config=`` update (layer options, ``AutoModelForCausalLM``'s
        config edits) goes to the wrapped model, which owns the config."""
        if "config" in updates:
            updates["base_module"] = self.base_module.clone(config=updates.pop("config"))
        return super().clone(**updates)

    def __call__(self, *args, logits_window=None, **kwargs):
        if logits_window is not None:
            kwargs["logits_window"] = logits_window
        deterministic = _deterministic(self.base_module, args, kwargs)
        with nn.intercept_methods(self._interceptor(deterministic)):
            return self.base_module(*args, **kwargs)

    def _interceptor(self, deterministic: bool):
        enabled, scaling, rate = self.adapters_enabled, self.scaling, self.lora_dropout
        keep_trainable, freeze = self.trainable_modules, self.freeze_base

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if isinstance(mod, nn.Embed) and context.method_name in ("__call__", "attend"):
                if not freeze or _in_modules(tuple(mod.scope.path), keep_trainable):
                    return next_fun(*args, **kwargs)
                return _embed(mod, context.method_name, args[0])
            if not (isinstance(mod, nn.Dense) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            if not mod.has_variable("params", "kernel"):  # initialisation
                return next_fun(*args, **kwargs)
            kernel = mod.get_variable("params", "kernel")
            trainable = _in_modules(tuple(mod.scope.path), keep_trainable)
            if trainable and not is_quantized(kernel):
                y = next_fun(*args, **kwargs)
            else:
                y = _dense(mod, args[0], kernel, freeze and not trainable)
            if enabled and mod.has_variable("params", "lora_A"):
                x = args[0]
                if rate > 0.0 and not deterministic:
                    x = nn.Dropout(rate, deterministic=False)(x, rng=mod.make_rng("dropout"))
                a = mod.get_variable("params", "lora_A")
                b = mod.get_variable("params", "lora_B")
                dt = y.dtype
                delta = jnp.dot(jnp.dot(x.astype(dt), a.astype(dt)), b.astype(dt))
                y = y + (delta * jnp.asarray(scaling, dt)).astype(y.dtype)
            return y

        return interceptor

    # -- the wrapped model's attributes ---------------------------------------------------------
    # (The field is not called ``lm``: under a value head, which shares its scope with its own
    # field ``lm``, a second child of that name would collide.)
    @property
    def config(self):
        return self.base_module.config

    @property
    def dtype(self):
        return self.base_module.dtype

    @property
    def num_labels(self):
        return self.base_module.num_labels

    @property
    def label_names(self):
        return self.base_module.label_names

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.base_module, "is_encoder_decoder", False))

    @property
    def positions_are_hard_limit(self) -> bool:
        return bool(getattr(self.base_module, "positions_are_hard_limit", False))

    def init_cache(self, *args, **kwargs):
        return self.base_module.init_cache(*args, **kwargs)

    def hf_config_dict(self) -> dict:
        m = self.base_module
        return m.hf_config_dict() if hasattr(m, "hf_config_dict") else m.config.to_dict()

    def with_dtype(self, dtype: Any) -> "LoraModel":
        """This wrapper over the base module computing in ``dtype`` (the trainers' bf16)."""
        from rljax.trainers.base import module_in_dtype

        return self.clone(base_module=module_in_dtype(self.base_module, dtype))


def _dense(mod: nn.Dense, x: jax.Array, kernel: Any, stop: bool) -> jax.Array:
    """flax ``nn.Dense.__call__`` with a dequantized and/or gradient-stopped kernel."""
    dtype = mod.dtype or x.dtype
    if is_quantized(kernel):
        kernel = kernel.dequantize(jnp.promote_types(dtype, jnp.float32) if mod.dtype is None else dtype)
    if stop:
        kernel = jax.lax.stop_gradient(kernel)
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=mod.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=mod.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _embed(mod: nn.Embed, method: str, x: jax.Array) -> jax.Array:
    """flax ``nn.Embed.__call__`` / ``attend`` with a gradient-stopped table."""
    table = jax.lax.stop_gradient(mod.get_variable("params", "embedding"))
    if method == "attend":
        query, table = promote_dtype(x, table, dtype=mod.dtype)
        return jnp.dot(query, table.T)
    (table,) = promote_dtype(table, dtype=mod.dtype, inexact=False)
    return jnp.take(table, x, axis=0)


def is_peft_module(module: Any) -> bool:
    """Whether ``module`` is a LoraModel or wraps one (through ``.lm``)."""
    while module is not None:
        if isinstance(module, LoraModel):
            return True
        module = getattr(module, "lm", None)
    return False


def with_adapters_enabled(module: Any, enabled: bool) -> Any:
    """``module`` (a LoraModel, or a head wrapping one through ``.lm``) with the adapters on or
    off; the same params serve both (PPO/DPO's reference = adapters off)."""
    if isinstance(module, LoraModel):
        return module.clone(adapters_enabled=enabled)
    if hasattr(module, "lm"):
        return module.clone(lm=with_adapters_enabled(module.lm, enabled))
    raise ValueError(f"{type(module).__name__} has no LoRA adapters (wrap it with get_peft_model first).")


def wrap_module(module: Any, config: LoraConfig) -> Any:
    """``module`` with a LoraModel inserted under its value-head wrapper (if any)."""
    kw = dict(scaling=config.scaling, lora_dropout=float(config.lora_dropout),
              trainable_modules=config.resolved_modules_to_save())
    if isinstance(module, LoraModel):
        return module.clone(**kw)
    from rljax.models.heads import CausalLMWithValueHead

    if isinstance(module, CausalLMWithValueHead):
        return module.clone(lm=wrap_module(module.lm, config))
    return LoraModel(module, **kw)


def _model_type(module: Any) -> str:
    return module.config.model_type


# --------------------------------------------------------------------------------------------
# PEFT files
# --------------------------------------------------------------------------------------------


def _expand_layers(path: Tuple[str, ...], arr: np.ndarray) -> List[Tuple[Tuple[str, ...], np.ndarray]]:
    """A scanned stack's leaf [L, ...] as per-layer (path with ``h_i``, array) pairs."""
    from rljax.models.attention import SCANNED_LAYER_NAMES

    stacked = [j for j, p in enumerate(path[:-1]) if p in SCANNED_LAYER_NAMES]
    if not stacked:
        return [(path, arr)]
    j = stacked[0]
    return [(path[:j] + (f"{path[j]}_{i}",) + path[j + 1:], arr[i]) for i in range(arr.shape[0])]


def adapter_state_dict(params: Any, config: LoraConfig, family: Any = None) -> Dict[str, np.ndarray]:
    """PEFT's ``get_peft_model_state_dict``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
    ``lora_B.weight`` ``[out, r]``; biases per ``bias=``; ``modules_to_save`` as
    ``<module>.modules_to_save.<param>`` (value head excluded: TRL saves it apart)."""
    from rljax.models.hub import HEAD_PREFIXES, hf_name

    saved = dataclasses.replace(config, inference_mode=False)  # a frozen adapter is saved all the same
    mask = flatten_dict(trainable_mask(params, saved, extra_trainable=()), is_leaf=lambda k, x: isinstance(x, bool))
    flat = flatten_dict(dict(params), is_leaf=lambda k, x: is_quantized(x))
    save = config.resolved_modules_to_save()
    out: Dict[str, np.ndarray] = {}
    for path, value in flat.items():
        if not mask.get(path, False) or is_quantized(value):
            continue
        arr = np.asarray(jax.device_get(value))
        for p, a in _expand_layers(path, arr):
            if p[-1] in LORA_LEAVES:
                out[PEFT_PREFIX + _module_name(p[:-1]) + f".{p[-1]}.weight"] = np.ascontiguousarray(a.T)
                continue
            name = hf_name(p)
            linear_t = p[-1] == "kernel" and ((family is not None and family.linear_is_transposed)
                                              or name.startswith(HEAD_PREFIXES))
            a = a.T if linear_t else a
            if _in_modules(p[:-1], save):
                module, leaf = name.rsplit(".", 1)
                name = f"{module}.modules_to_save.{leaf}"
            out[PEFT_PREFIX + name] = np.ascontiguousarray(a)
    return out


def load_adapter_state_dict(params: Any, state_dict: Dict[str, np.ndarray], config: LoraConfig,
                            family: Any = None) -> Any:
    """``params`` (base, with or without adapters) with the adapters of a PEFT state dict
    (keys as :func:`adapter_state_dict` writes; PEFT's ``.default`` adapter names accepted).
    Raises a ValueError naming keys that match no layer."""
    from rljax.models.hub import HEAD_PREFIXES, hf_name

    sd = {}
    for k, v in state_dict.items():
        k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        k = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k).replace(".modules_to_save.default.", ".modules_to_save.")
        sd[k] = np.asarray(v)
    base = strip_adapters(params)
    flat = flatten_dict(dict(base), is_leaf=lambda k, x: is_quantized(x))
    scopes = _dense_scopes(base)
    out = dict(flat)
    used = set()

    def fetch(name: str) -> Optional[np.ndarray]:
        if name in sd:
            used.add(name)
            return sd[name]
        return None

    from rljax.models.attention import SCANNED_LAYER_NAMES

    for scope in scopes:
        lead, d_in, d_out = _kernel_in_out(flat[scope + ("kernel",)])
        for leaf, transpose_to in (("lora_A", None), ("lora_B", None)):
            del transpose_to
            per_layer = _expand_layers(scope + (leaf,), np.zeros(lead + (1,)) if lead else np.zeros(()))
            arrays = [fetch(_module_name(p[:-1]) + f".{leaf}.weight") for p, _ in per_layer]
            if all(a is None for a in arrays):
                continue
            if any(a is None for a in arrays):
                raise ValueError(f"The adapter file has {leaf} for some layers of {_module_name(scope)} only.")
            arrays = [a.T for a in arrays]
            stacked = np.stack(arrays) if lead else arrays[0]
            expect = lead + ((d_in, None) if leaf == "lora_A" else (None, d_out))
            if stacked.shape[len(lead) + (0 if leaf == "lora_A" else 1)] != expect[len(lead) + (0 if leaf == "lora_A" else 1)] \
                    or stacked.shape[len(lead) + (1 if leaf == "lora_A" else 0)] != config.r:
                raise ValueError(
                    f"Adapter tensor {_module_name(scope)}.{leaf}.weight has shape {arrays[0].T.shape}; the model and "
                    f"r={config.r} expect {(config.r, d_in) if leaf == 'lora_A' else (d_out, config.r)}."
                )
            out[scope + (leaf,)] = jnp.asarray(stacked, jnp.float32)
    for path, value in flat.items():
        if is_quantized(value) or path[-1] in LORA_LEAVES:
            continue
        names = []
        for p, _ in _expand_layers(path, np.zeros((value.shape[0],) + (1,)) if any(
                q in SCANNED_LAYER_NAMES for q in path[:-1]) else np.zeros(())):
            name = hf_name(p)
            module, leaf = name.rsplit(".", 1)
            names.append((name, f"{module}.modules_to_save.{leaf}"))
        arrays = [fetch(alt) if fetch(alt) is not None else fetch(name) for name, alt in names]
        if all(a is None for a in arrays):
            continue
        linear_t = path[-1] == "kernel" and ((family is not None and family.linear_is_transposed)
                                             or names[0][0].startswith(HEAD_PREFIXES))
        arrays = [a.T if linear_t else a for a in arrays]
        arr = np.stack(arrays) if len(arrays) > 1 or tuple(value.shape) != arrays[0].shape else arrays[0]
        if tuple(arr.shape) != tuple(value.shape):
            raise ValueError(f"Adapter tensor {names[0][0]} has shape {arr.shape}, the model expects {tuple(value.shape)}.")
        out[path] = jnp.asarray(arr, value.dtype)
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(
            f"The adapter file has tensors that match no layer of this model: {unused[:10]}"
            f"{' ...' if len(unused) > 10 else ''}. Was it trained on another architecture?"
        )
    return unflatten_dict(out)


def save_adapter(directory: str, params: Any, config: LoraConfig, family: Any = None,
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = config.to_dict()
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    if cfg.get("task_type") is None:
        cfg["task_type"] = TaskType.CAUSAL_LM
    sd = adapter_state_dict(params, config, family)
    save_file(sd, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2)


def read_adapter_config(directory: str) -> LoraConfig:
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.exists(path):
        raise ValueError(f"No {ADAPTER_CONFIG_NAME} in {directory}: not a PEFT adapter directory.")
    with open(path) as f:
        return LoraConfig.from_any(json.load(f))


def load_adapter(directory: str, params: Any, family: Any = None) -> Tuple[LoraConfig, Any]:
    """Read a PEFT adapter directory onto ``params`` -> (config, params with adapters)."""
    from rljax.models.hub import _read_safetensors

    config = read_adapter_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise ValueError(f"No {ADAPTER_WEIGHTS_NAME} in {directory} (PEFT's older adapter_model.bin is not read).")
    return config, load_adapter_state_dict(params, _read_safetensors(weights), config, family)


# --------------------------------------------------------------------------------------------
# A second adapter on the same base: TRL's reward adapter (ppo_multi_adapter.py)
# --------------------------------------------------------------------------------------------

#: Module names TRL looks for in a reward adapter's file (its ``supported_rm_modules``).
REWARD_SCORE_MODULES = ("score",)


def adapter_leaves(params: Any) -> Any:
    """The ``lora_A``/``lora_B`` leaves of ``params`` alone (a small tree, same paths)."""
    flat = flatten_dict(dict(params), is_leaf=lambda k, x: is_quantized(x))
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] in LORA_LEAVES})


def with_adapter(params: Any, adapter: Any) -> Any:
    """``params`` with its adapters replaced by ``adapter`` (a tree of ``lora_A``/``lora_B``
    leaves, as :func:`adapter_leaves` gives). A pytree re-arrangement: under ``jax.jit`` the
    base arrays are shared, not copied. Jittable."""
    flat = flatten_dict(dict(strip_adapters(params)), is_leaf=lambda k, x: is_quantized(x))
    flat.update(flatten_dict(dict(adapter)))
    return unflatten_dict(flat)


def load_reward_adapter(directory: str, params: Any, family: Any = None) -> Tuple[LoraConfig, Dict[str, Any]]:
    """TRL's ``add_and_load_reward_modeling_adapter``: a PEFT adapter directory trained as a
    reward model (``SEQ_CLS``: LoRA + a ``score`` head) read onto the policy's base ``params``
    -> ``(config, {"adapter": lora leaves only, "score": {"kernel": [hidden, num_labels],
    ["bias": [num_labels]]}})`` (float32). The base is not copied: only the adapter and the head
    are returned. As TRL, every tensor whose name contains ``score`` belongs to the head."""
    from rljax.models.hub import _read_safetensors

    config = read_adapter_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise ValueError(f"No {ADAPTER_WEIGHTS_NAME} in {directory}: reward_adapter must be a PEFT adapter directory "
                         "saved by a reward trainer with peft_config (task_type='SEQ_CLS').")
    sd = _read_safetensors(weights)
    is_head = lambda k: any(m in k.split(".") for m in REWARD_SCORE_MODULES)
    head = {k.split(".")[-1]: np.asarray(v, np.float32) for k, v in sd.items() if is_head(k)}
    if "weight" not in head:
        raise ValueError(f"The reward adapter in {directory} has no score head (no tensor named '*score*.weight'); "
                         "train it as a sequence classifier (RewardTrainer with peft_config, task_type='SEQ_CLS').")
    body = {k: v for k, v in sd.items() if not is_head(k)}
    config = dataclasses.replace(config, modules_to_save=None, task_type=TaskType.CAUSAL_LM, inference_mode=True)
    loaded = load_adapter_state_dict(strip_adapters(params), body, config, family)
    score = {"kernel": jnp.asarray(head["weight"].T)}
    if "bias" in head:
        score["bias"] = jnp.asarray(head["bias"])
    return config, {"adapter": adapter_leaves(loaded), "score": score}


def make_reward_adapter_scorer(module: Any, config: LoraConfig) -> Callable[..., jax.Array]:
    """``score(params, reward, input_ids [B, T], attention_mask [B, T] | None) -> [B, T,
    num_labels]`` (float32): TRL's ``compute_reward_score``. ``module``: the policy (a LoRA
    value-head model or LM); ``params``: its params (base + policy adapters; the policy adapters
    are swapped for ``reward["adapter"]`` inside the function, so the one base serves both);
    ``reward``: :func:`load_reward_adapter`'s dict. The last hidden state goes through the
    score head at every position, as TRL's (read the last real token's row for a sequence
    score); the LM head runs on one column only. Pure and jittable."""
    lm = wrap_module(_unwrap(getattr(module, "lm", module)), dataclasses.replace(config, lora_dropout=0.0))

    def score(params: Any, reward: Dict[str, Any], input_ids: jax.Array,
              attention_mask: Optional[jax.Array] = None) -> jax.Array:
        from rljax.models.attention import apply_windowed

        chex.assert_rank(input_ids, 2)
        p = with_adapter({k: v for k, v in params.items() if k != "v_head"}, reward["adapter"])
        t = input_ids.shape[1]
        out = apply_windowed(lm, {"params": p}, input_ids, attention_mask, deterministic=True,
                             logits_window=(t - 1, 1))
        head = reward["score"]
        y = jnp.dot(out.hidden_states.astype(jnp.float32), head["kernel"].astype(jnp.float32))
        return y + head["bias"].astype(jnp.float32) if "bias" in head else y

    return score


# --------------------------------------------------------------------------------------------
# PeftModel: the user-facing object
# --------------------------------------------------------------------------------------------


def _module_params(model: Any) -> Tuple[Any, Any]:
    if isinstance(model, tuple) and len(model) == 2:
        return model
    if hasattr(model, "module") and hasattr(model, "params"):
        return model.module, model.params
    raise ValueError(
        f"Expected a (module, params) tuple or a model object with .module and .params, got {type(model).__name__}."
    )


class PeftModel:
    """PEFT's ``PeftModel`` over rljax's (``.module``, ``.params``): ``module`` is the wrapped
    model (a :class:`LoraModel`, under the value head if any), ``params`` the base params with
    the adapters. ``module, params = peft_model`` unpacks it; trainers accept it as ``model``."""

    def __init__(self, module: Any, params: Any, peft_config: LoraConfig, base_model: Any = None):
        self.module = module
        self.params = params
        self.peft_config = {"default": peft_config}
        self.active_adapter = "default"
        self.base_model = base_model

    @property
    def config(self):
        return getattr(self.base_model, "config", None) or self.module.config

    @property
    def lora_config(self) -> LoraConfig:
        return self.peft_config["default"]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.module, self.params))

    def trainable_mask(self) -> Any:
        return trainable_mask(self.params, self.lora_config)

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """``(trainable, all)`` parameter counts (quantized weights counted as their floats)."""
        mask = jax.tree_util.tree_leaves(self.trainable_mask())
        leaves = jax.tree_util.tree_leaves(self.params)
        train = sum(int(np.prod(x.shape)) for x, m in zip(leaves, mask) if m)
        total = sum(int(np.prod(getattr(x, "shape", ()))) for x in jax.tree_util.tree_leaves(
            self.params, is_leaf=is_quantized))
        return train, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context in which ``self.module`` runs with the adapters off (same params)."""
        module = self.module
        self.module = with_adapters_enabled(module, False)
        try:
            yield
        finally:
            self.module = module

    def get_base_model(self) -> Tuple[Any, Any]:
        """(the unwrapped module, the params without adapters)."""
        return _unwrap(self.module), strip_adapters(self.params)

    def merge_and_unload(self, dtype: Any = None) -> Tuple[Any, Any]:
        """(plain module, params with the adapters merged into the kernels), quantized kernels
        dequantized; usable with ``rljax.models.save_pretrained`` and transformers."""
        return _unwrap(self.module), merge_adapters(self.params, self.lora_config, dtype)

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        """PEFT's files in ``save_directory`` (plus ``v_head`` in ``model.safetensors`` for a
        value-head model, where TRL's loader reads it)."""
        from rljax.models.hub import family_of

        base = getattr(self.base_model, "name_or_path", None) or self.lora_config.base_model_name_or_path
        save_adapter(save_directory, self.params, self.lora_config, family_of(self.module.config), base)
        if "v_head" in self.params:
            from safetensors.numpy import save_file

            head = self.params["v_head"]["summary"]
            save_file({"v_head.summary.weight": np.ascontiguousarray(np.asarray(head["kernel"]).T),
                       "v_head.summary.bias": np.asarray(head["bias"])},
                      os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model: Any, model_id: str, is_trainable: bool = False, **_: Any) -> "PeftModel":
        """Load a PEFT adapter directory onto ``model`` ((module, params) or a model object);
    ``is_trainable=False`` (PEFT's default) loads it frozen (``inference_mode``: trainers then
    train only the value head, if any)."""
        from rljax.models.hub import family_of

        module, params = _module_params(model)
        base_params = strip_adapters(params)
        config, loaded = load_adapter(model_id, base_params, family_of(module.config))
        config = dataclasses.replace(config, inference_mode=not is_trainable)  # PEFT: frozen unless is_trainable
        return cls(wrap_module(_unwrap(module), config), loaded, config, base_model=model)


def _unwrap(module: Any) -> Any:
    """``module`` with every LoraModel removed."""
    if isinstance(module, LoraModel):
        return _unwrap(module.base_module)
    if hasattr(module, "lm") and is_peft_module(module):
        return module.clone(lm=_unwrap(module.lm))
    return module


def get_peft_model(model: Any, peft_config: Any, *, rng: Optional[jax.Array] = None,
                   adapter_dtype: Any = jnp.float32) -> PeftModel:
    """PEFT's ``get_peft_model``: ``model`` ((module, params) or an object with ``.module`` and
    ``.params``) with fresh adapters per ``peft_config`` (a LoraConfig, rljax's or PEFT's).
    ``rng`` seeds ``lora_A`` (default ``PRNGKey(0)``)."""
    config = LoraConfig.from_any(peft_config)
    module, params = _module_params(model)
    if is_peft_module(module):
        raise ValueError("The model already has LoRA adapters; pass the base model to get_peft_model.")
    params = inject_adapters(params, config, _model_type(module), jax.random.PRNGKey(0) if rng is None else rng,
                             adapter_dtype)
    save = config.resolved_modules_to_save()
    if save:
        found = [n for n in save if any(_in_modules(p[:-1], (n,)) for p in flatten_dict(
            dict(params), is_leaf=lambda k, x: is_quantized(x)))]
        missing = [n for n in save if n not in found and n not in ("score", "classifier")]
        if missing:
            raise ValueError(f"LoraConfig.modules_to_save names {missing}, which this model does not have.")
    return PeftModel(wrap_module(module, config), params, config,
                     base_model=model if not isinstance(model, tuple) else None)
