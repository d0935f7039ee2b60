"""HF checkpoint I/O: ``from_pretrained`` / ``save_pretrained`` over safetensors (no torch).

Parameter names map one-to-one: a flax path ``transformer/h_3/attn/c_attn/kernel``
is the HF tensor ``transformer.h.3.attn.c_attn.weight``. Families register how
their modules are built and whether Dense kernels are stored transposed
(PyTorch ``nn.Linear`` is ``[out, in]``; GPT-2's ``Conv1D`` is ``[in, out]``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.models.attention import SCANNED_LAYER_NAMES, check_layer_options


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps onto an rljax module."""

    config_cls: Any
    module_cls: Any
    linear_is_transposed: bool  # True for nn.Linear checkpoints ([out, in] weights)
    tied_key: Optional[str] = "lm_head.weight"  # HF key that may be absent when embeddings are tied
    ignore_keys: Tuple[str, ...] = ()  # regexes of HF buffers to skip (e.g. GPT-2 attn.bias)
    add_prefix: Optional[str] = None  # prefix HF base-model checkpoints omit (e.g. "transformer.")
    trunk_cls: Any = None  # the module without the LM head (for sequence-score / value heads)
    trunk_name: Optional[str] = None  # its HF prefix: "transformer" (GPT-2), "model" (Llama family)
    hf_prefix: str = ""  # HF class-name prefix: "GPT2" -> GPT2ForSequenceClassification
    embed_key: Optional[str] = None  # HF name of the input embedding a tied head reuses (None: transformer.wte / model.embed_tokens)


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")

FAMILIES: Dict[str, Family] = {}
_LAYER = re.compile(r"^(h|layers|block|layer)_(\d+)$")  # T5: block.{i}.layer.{j}
# Heads are PyTorch nn.Linear in every HF family ([out, in]), even where the trunk uses Conv1D.
HEAD_PREFIXES = ("lm_head.", "score.", "v_head.")


def register_family(model_type: str, family: Family) -> None:
    FAMILIES[model_type] = family


def _family(model_type: str) -> Family:
    _ensure_registered()
    if model_type not in FAMILIES:
        raise ValueError(f"Unsupported model_type {model_type!r}; rljax supports {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def family_of(config) -> Family:
    """The registered Family of an rljax config object."""
    return _family(config.model_type)


def _ensure_registered() -> None:
    # Importing the family modules registers them.
    import rljax.models.gpt2  # noqa: F401
    import rljax.models.llama  # noqa: F401
    import rljax.models.gemma  # noqa: F401
    import rljax.models.gptj  # noqa: F401
    import rljax.models.codegen  # noqa: F401
    import rljax.models.gpt_neo  # noqa: F401
    import rljax.models.bloom  # noqa: F401
    import rljax.models.gpt_neox  # noqa: F401
    import rljax.models.opt  # noqa: F401
    import rljax.models.t5  # noqa: F401


def hf_name(path: Tuple[str, ...]) -> str:
    """flax param path -> HF tensor name."""
    parts = []
    for p in path[:-1]:
        m = _LAYER.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def _transposed(path: Tuple[str, ...], name: str, family: Family) -> bool:
    return path[-1] == "kernel" and (family.linear_is_transposed or name.startswith(HEAD_PREFIXES))


def _layer_names(path: Tuple[str, ...], shape: Tuple[int, ...]) -> list:
    """[(HF name, layer index or None)] of one flax leaf. A leaf of a scanned layer stack
    (a path element named exactly ``h``/``layers``, leading axis = layer) is one tensor per layer."""
    stacked = [j for j, p in enumerate(path[:-1]) if p in SCANNED_LAYER_NAMES]
    if not stacked:
        return [(hf_name(path), None)]
    j = stacked[0]
    return [(hf_name(path[:j] + (f"{path[j]}_{i}",) + path[j + 1:]), i) for i in range(shape[0])]


def params_to_state_dict(params, family: Family) -> Dict[str, np.ndarray]:
    """Flax params -> HF state dict of numpy arrays (bfloat16 stays bfloat16, as ml_dtypes).
    Scanned layer stacks are written one tensor per layer, under the per-layer HF names."""
    out = {}
    for path, value in flatten_dict(params).items():
        arr = np.asarray(jax.device_get(value))
        for name, i in _layer_names(path, arr.shape):
            a = arr if i is None else arr[i]
            out[name] = a.T if _transposed(path, name, family) else a
    return out


def state_dict_to_params(
    state_dict: Dict[str, np.ndarray],
    template,
    family: Family,
    dtype=None,
    *,
    defaults=None,
    ignore: Tuple[str, ...] = (),
):
    """HF state dict -> flax params shaped like ``template`` (an abstract or real params tree).

    ``defaults``: a (partial) params tree used for tensors the checkpoint lacks (e.g. a freshly
    initialised value head); ``ignore``: regexes of checkpoint keys to drop silently.
    Raises a ValueError listing missing and unexpected keys, and shape mismatches.
    """
    sd = dict(state_dict)
    prefix = family.add_prefix
    if prefix and not any(k.startswith(prefix) for k in sd):  # a bare base-model checkpoint
        sd = {(k if k.startswith(HEAD_PREFIXES) else prefix + k): v for k, v in sd.items()}
    for pat in tuple(family.ignore_keys) + tuple(ignore):
        sd = {k: v for k, v in sd.items() if not re.search(pat, k)}
    flat = flatten_dict(template)
    wanted = {name: (p, i) for p in flat for name, i in _layer_names(p, tuple(flat[p].shape))}
    fallback = {}
    for p, v in (flatten_dict(defaults).items() if defaults else ()):
        fallback.update({name: (v if i is None else v[i]) for name, i in _layer_names(p, tuple(np.shape(v)))})
    missing = sorted(set(wanted) - set(sd) - set(fallback))
    unexpected = sorted(set(sd) - set(wanted))
    if family.tied_key in unexpected and family.tied_key not in wanted:
        unexpected.remove(family.tied_key)  # tied checkpoints may still store lm_head
    if missing or unexpected:
        raise ValueError(
            "Checkpoint does not match the model config.\n"
            f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            "Check that config.json belongs to these weights (model_type, layer counts, tie_word_embeddings)."
        )
    out, layers = {}, {}
    for name, (path, i) in wanted.items():
        if name not in sd:
            arr = np.asarray(fallback[name])
        else:
            arr = np.asarray(sd[name])
            if _transposed(path, name, family):
                arr = arr.T
        expect = tuple(flat[path].shape)[0 if i is None else 1:]
        if arr.shape != expect:
            raise ValueError(f"Tensor {name} has shape {arr.shape}, the config expects {expect}.")
        if i is None:
            out[path] = jnp.asarray(arr, dtype=dtype or flat[path].dtype)
        else:  # one layer of a scanned stack
            layers.setdefault(path, {})[i] = arr
    for path, per_layer in layers.items():
        out[path] = jnp.asarray(np.stack([per_layer[i] for i in range(len(per_layer))]), dtype=dtype or flat[path].dtype)
    return unflatten_dict(out)


def config_from_dict(d: dict):
    if "model_type" not in d:
        raise ValueError("config.json has no 'model_type'; it must name the architecture (e.g. 'gpt2', 'llama').")
    return _family(d["model_type"]).config_cls.from_dict(d)


def model_from_config(config, dtype=jnp.float32):
    """Build the flax module for an rljax config object (or an HF config dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return _family(config.model_type).module_cls(config, dtype=dtype)


def _init_args(model) -> tuple:
    """Dummy call arguments for ``model.init``: token ids, plus decoder ids for encoder-decoders."""
    ids = jnp.zeros((1, 1), jnp.int32)
    if getattr(model, "is_encoder_decoder", False):
        return (ids, None, ids)
    return (ids,)


def abstract_params(model) -> Any:
    """Param shapes/dtypes of ``model`` without allocating them."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_init_args(model)))["params"]


def init_params(model, rng: jax.Array) -> Any:
    """Randomly initialised params (HF-style N(0, initializer_range) is not reproduced; flax defaults)."""
    return jax.jit(model.init)(rng, *_init_args(model))["params"]


_DTYPE_NAMES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16, "float": jnp.float32}


def as_jax_dtype(dtype, checkpoint_config: Optional[dict] = None):
    """A JAX dtype (or None = float32 params) from what HF users pass as ``torch_dtype``/``dtype``.

    Accepts None, a JAX/numpy dtype, a name ("float32", "bfloat16", "float16", "bf16", ...),
    a ``torch.float32``/``torch.bfloat16``/``torch.float16`` object (torch is never imported),
    or "auto": the checkpoint's own dtype (config.json ``torch_dtype``/``dtype``; float32 if absent).
    """
    if dtype is None:
        return None
    if type(dtype).__module__ == "torch":  # torch.dtype objects print as "torch.bfloat16"
        dtype = str(dtype).split(".", 1)[-1]
    if isinstance(dtype, str):
        if dtype == "auto":
            saved = (checkpoint_config or {}).get("torch_dtype") or (checkpoint_config or {}).get("dtype")
            return as_jax_dtype(saved) if saved else None
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}, 'auto' or a jnp dtype.")
        return _DTYPE_NAMES[dtype]
    try:
        return jnp.dtype(dtype).type
    except TypeError as e:
        raise ValueError(f"Unknown dtype {dtype!r}; pass e.g. jnp.bfloat16, 'bfloat16' or torch.bfloat16.") from e


def merge_dtype_args(dtype, torch_dtype):
    """``dtype`` and its HF alias ``torch_dtype``: at most one may be given (or both equal)."""
    if dtype is not None and torch_dtype is not None and str(dtype) != str(torch_dtype):
        if as_jax_dtype(dtype) != as_jax_dtype(torch_dtype):
            raise ValueError(f"Got dtype={dtype!r} and torch_dtype={torch_dtype!r}; pass only one of them.")
    return dtype if dtype is not None else torch_dtype


def check_trust_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is not supported: rljax runs no code from checkpoints, only its own model "
            f"families ({sorted(FAMILIES) or 'gpt2, llama, mistral, qwen2'}). Drop the argument."
        )


def _resolve(path_or_id: str, revision: Optional[str] = None) -> str:
    if os.path.isdir(path_or_id):
        return path_or_id  # a local directory is one version: revision does not apply
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; pass the checkpoint DIRECTORY holding config.json.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown id, ...
        raise ValueError(
            f"{path_or_id!r} is not a local directory and could not be fetched from the HF hub ({type(e).__name__}: {e}). "
            "Pass a local directory with config.json + *.safetensors."
        ) from e


def _read_safetensors(filename: str) -> Dict[str, np.ndarray]:
    """One safetensors file -> numpy arrays. BF16 tensors come back as ``ml_dtypes.bfloat16``
    (never silently upcast), whatever the installed safetensors returns for them."""
    import ml_dtypes
    from safetensors import safe_open

    try:
        with open(filename, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        with safe_open(filename, framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(
            f"Could not read {filename}: {type(e).__name__}: {e}. "
            "The file is corrupt or truncated; re-download or re-save it."
        ) from e
    for k, info in header.items():
        if k != "__metadata__" and info.get("dtype") == "BF16" and arrays[k].dtype != ml_dtypes.bfloat16:
            arrays[k] = arrays[k].view(ml_dtypes.bfloat16)  # raw 2-byte values ("V2"/uint16) -> bfloat16
    return arrays


def load_state_dict(directory: str) -> Dict[str, np.ndarray]:
    """Read ``model.safetensors`` or a sharded ``model.safetensors.index.json`` as numpy arrays."""
    single = os.path.join(directory, SINGLE_FILE)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
        absent = [os.path.basename(fn) for fn in files if not os.path.exists(fn)]
        if absent:
            raise ValueError(f"{index} names shards that are not in {directory}: {absent}.")
    else:
        present = sorted(os.listdir(directory))
        hint = " Found PyTorch .bin weights: re-save them with safetensors (save_pretrained(..., safe_serialization=True))." if any(
            p.endswith(".bin") for p in present) else ""
        raise ValueError(f"No model.safetensors or model.safetensors.index.json in {directory} (files: {present}).{hint}")
    sd = {}
    for fn in files:
        sd.update(_read_safetensors(fn))
    return sd


def read_checkpoint(
    path_or_id: str, revision: Optional[str] = None, trust_remote_code: bool = False
) -> Tuple[str, dict]:
    """Resolve a checkpoint directory (or hub id when online) -> (directory, config.json dict).

    ``revision`` (branch, tag or commit) picks the hub version; a local directory ignores it.
    ``trust_remote_code=True`` raises: rljax runs no code shipped with checkpoints.
    """
    check_trust_remote_code(trust_remote_code)
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise ValueError(f"Expected a checkpoint directory or hub id (a string), got {type(path_or_id).__name__}.")
    directory = _resolve(os.fspath(path_or_id), revision)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"No config.json in {directory}; a checkpoint directory needs config.json + safetensors weights.")
    with open(cfg_path) as f:
        return directory, json.load(f)


def from_pretrained(
    path_or_id: str,
    dtype=None,
    *,
    torch_dtype=None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    scan_layers: Optional[bool] = None,
    remat_policy: Optional[str] = None,
) -> Tuple[Any, Any]:
    """Load an HF causal-LM checkpoint directory (or hub id when online) -> (module, params).

    ``dtype`` (alias ``torch_dtype``, see ``as_jax_dtype``): None keeps float32 params;
    ``jnp.bfloat16`` casts params and compute; "auto" uses the checkpoint's dtype.
    ``revision``: the hub version (a local directory ignores it). ``trust_remote_code=True``
    raises. Value-head tensors (``v_head.*``, written by TRL / rljax value-head models) are
    ignored, as transformers ignores them. ``scan_layers=True``: params stacked on a layer axis
    for an ``nn.scan`` layer stack; ``remat_policy`` ("none", "full", "dots"): remat per block
    (see ``rljax.models.attention.run_layers``; None keeps the defaults, off).
    """
    directory, cfg = read_checkpoint(path_or_id, revision, trust_remote_code)
    dtype = as_jax_dtype(merge_dtype_args(dtype, torch_dtype), cfg)
    config = config_from_dict(cfg)
    options = {k: v for k, v in (("scan_layers", scan_layers), ("remat_policy", remat_policy)) if v is not None}
    if options:
        check_layer_options(options.get("remat_policy", "none"), options.get("scan_layers", False))
        if not hasattr(config, "scan_layers"):
            raise ValueError(f"{config.model_type} models have no scan_layers/remat_policy options; drop them.")
        config = dataclasses.replace(config, **options)
    model = model_from_config(config, dtype=dtype or jnp.float32)
    family = _family(config.model_type)
    params = state_dict_to_params(
        load_state_dict(directory), abstract_params(model), family, dtype=dtype, ignore=(r"^v_head\.",)
    )
    return model, params


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (decimal units as HF uses them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]I?)?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"Cannot parse size {size!r}; use an int (bytes) or e.g. '500MB', '5GB', '2GiB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _shard(state_dict: Dict[str, np.ndarray], limit: int):
    """Split tensors, in order, into shards of at most ``limit`` bytes (a larger tensor gets its own)."""
    shards, current, size = [], {}, 0
    for name, arr in state_dict.items():
        if current and size + arr.nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    return shards


def _dtype_name(state_dict: Dict[str, np.ndarray]) -> str:
    """The dtype holding most of the bytes ("float32", "bfloat16", ...), for config.json."""
    totals: Dict[str, int] = {}
    for arr in state_dict.values():
        totals[arr.dtype.name] = totals.get(arr.dtype.name, 0) + arr.nbytes
    return max(totals, key=totals.get)


def save_pretrained(
    model,
    params,
    path: str,
    *,
    overwrite: bool = False,
    max_shard_size: Optional[Union[int, str]] = None,
    extra_config: Optional[dict] = None,
) -> None:
    """Write an HF directory (config.json + safetensors weights) that transformers loads.

    ``model`` is any rljax module with a ``.config`` (causal LMs, and the heads in
    ``rljax.models.heads``, which supply their own ``hf_config_dict()``). With ``max_shard_size``
    (bytes, or e.g. "500MB") weights larger than that are split into
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    bfloat16 params are written as BF16 tensors. Refuses to overwrite existing weights unless
    ``overwrite=True`` (which also removes the old weight files). ``extra_config``: more
    config.json entries (e.g. attributes a user set on an HF-style config).
    """
    from safetensors.numpy import save_file

    existing = [f for f in (os.listdir(path) if os.path.isdir(path) else []) if _WEIGHT_FILE.match(f)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{path} already holds weights ({sorted(existing)}); "
            "pass overwrite=True to replace them, or choose another path."
        )
    os.makedirs(path, exist_ok=True)
    family = _family(model.config.model_type)
    sd = {k: np.ascontiguousarray(v) for k, v in params_to_state_dict(params, family).items()}
    cfg = model.hf_config_dict() if hasattr(model, "hf_config_dict") else model.config.to_dict()
    cfg.update(extra_config or {})
    cfg["torch_dtype"] = _dtype_name(sd)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards = [sd] if limit is None or sum(a.nbytes for a in sd.values()) <= limit else _shard(sd, limit)
    for f in existing:
        os.remove(os.path.join(path, f))
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        target = os.path.join(path, name)
        save_file(shard, target + ".tmp", metadata={"format": "pt"})
        os.replace(target + ".tmp", target)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
