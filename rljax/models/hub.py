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
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps onto an rljax module."""

    config_cls: Any
    module_cls: Any
    linear_is_transposed: bool  # True for nn.Linear checkpoints ([out, in] weights)
    tied_key: Optional[str] = "lm_head.weight"  # HF key that may be absent when embeddings are tied
    ignore_keys: Tuple[str, ...] = ()  # regexes of HF buffers to skip (e.g. GPT-2 attn.bias)
    add_prefix: Optional[str] = None  # prefix HF base-model checkpoints omit (e.g. "transformer.")


FAMILIES: Dict[str, Family] = {}
_LAYER = re.compile(r"^(h|layers)_(\d+)$")


def register_family(model_type: str, family: Family) -> None:
    FAMILIES[model_type] = family


def _family(model_type: str) -> Family:
    _ensure_registered()
    if model_type not in FAMILIES:
        raise ValueError(f"Unsupported model_type {model_type!r}; rljax supports {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def _ensure_registered() -> None:
    # Importing the family modules registers them.
    import rljax.models.gpt2  # noqa: F401

    try:
        import rljax.models.llama  # noqa: F401
    except ImportError:
        pass


def hf_name(path: Tuple[str, ...]) -> str:
    """flax param path -> HF tensor name."""
    parts = []
    for p in path[:-1]:
        m = _LAYER.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def params_to_state_dict(params, family: Family) -> Dict[str, np.ndarray]:
    """Flax params -> HF state dict of numpy arrays."""
    out = {}
    for path, value in flatten_dict(params).items():
        arr = np.asarray(jax.device_get(value))
        if path[-1] == "kernel" and family.linear_is_transposed:
            arr = arr.T
        out[hf_name(path)] = arr
    return out


def state_dict_to_params(state_dict: Dict[str, np.ndarray], template, family: Family, dtype=None):
    """HF state dict -> flax params shaped like ``template`` (an abstract or real params tree).

    Raises a ValueError listing missing and unexpected keys, and shape mismatches.
    """
    sd = dict(state_dict)
    if family.add_prefix and not any(k.startswith(family.add_prefix) for k in sd):
        sd = {(k if k.startswith("lm_head") else family.add_prefix + k): v for k, v in sd.items()}
    for pat in family.ignore_keys:
        sd = {k: v for k, v in sd.items() if not re.search(pat, k)}
    flat = flatten_dict(template)
    wanted = {hf_name(p): p for p in flat}
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted))
    if family.tied_key in unexpected:
        unexpected.remove(family.tied_key)  # tied checkpoints may still store lm_head
    if missing or unexpected:
        raise ValueError(
            "Checkpoint does not match the model config.\n"
            f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            "Check that config.json belongs to these weights (model_type, layer counts, tie_word_embeddings)."
        )
    out = {}
    for name, path in wanted.items():
        arr = np.asarray(sd[name])
        if path[-1] == "kernel" and family.linear_is_transposed:
            arr = arr.T
        expect = tuple(flat[path].shape)
        if arr.shape != expect:
            raise ValueError(f"Tensor {name} has shape {arr.shape}, the config expects {expect}.")
        tgt = dtype or flat[path].dtype
        out[path] = jnp.asarray(arr, dtype=tgt)
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


def abstract_params(model) -> Any:
    """Param shapes/dtypes of ``model`` without allocating them."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def init_params(model, rng: jax.Array) -> Any:
    """Randomly initialised params (HF-style N(0, initializer_range) is not reproduced; flax defaults)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(rng, ids)["params"]


def _resolve(path_or_id: str) -> str:
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; pass the checkpoint DIRECTORY holding config.json.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown id, ...
        raise ValueError(
            f"{path_or_id!r} is not a local directory and could not be fetched from the HF hub ({type(e).__name__}: {e}). "
            "Pass a local directory with config.json + *.safetensors."
        ) from e


def load_state_dict(directory: str) -> Dict[str, np.ndarray]:
    """Read ``model.safetensors`` or a sharded ``model.safetensors.index.json`` as numpy arrays."""
    from safetensors.numpy import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
    else:
        present = sorted(os.listdir(directory))
        hint = " Found PyTorch .bin weights: re-save them with safetensors (save_pretrained(..., safe_serialization=True))." if any(
            p.endswith(".bin") for p in present) else ""
        raise ValueError(f"No model.safetensors or model.safetensors.index.json in {directory} (files: {present}).{hint}")
    sd = {}
    for fn in files:
        try:
            sd.update(load_file(fn))
        except Exception as e:
            raise ValueError(f"Could not read {fn}: {e}. The file is corrupt or truncated; re-download or re-save it.") from e
    return {k: (v.astype(np.float32) if v.dtype == np.dtype("V2") else v) for k, v in sd.items()}


def from_pretrained(path_or_id: str, dtype=None) -> Tuple[Any, Any]:
    """Load an HF causal-LM checkpoint directory (or hub id when online) -> (module, params).

    ``dtype``: None keeps float32 params; ``jnp.bfloat16`` casts params and compute.
    """
    directory = _resolve(path_or_id)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"No config.json in {directory}; a checkpoint directory needs config.json + safetensors weights.")
    with open(cfg_path) as f:
        config = config_from_dict(json.load(f))
    model = model_from_config(config, dtype=dtype or jnp.float32)
    family = _family(config.model_type)
    params = state_dict_to_params(load_state_dict(directory), abstract_params(model), family, dtype=dtype)
    return model, params


def save_pretrained(model, params, path: str, *, overwrite: bool = False, max_shard_size: Optional[int] = None) -> None:
    """Write an HF directory (config.json + model.safetensors) that transformers loads.

    Refuses to overwrite existing weights unless ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    target = os.path.join(path, "model.safetensors")
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it, or choose another path.")
    os.makedirs(path, exist_ok=True)
    config = model.config
    family = _family(config.model_type)
    sd = params_to_state_dict(params, family)
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    tmp = target + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, target)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
