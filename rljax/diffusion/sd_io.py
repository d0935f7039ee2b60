"""Diffusers / transformers checkpoint I/O for the Stable Diffusion modules (safetensors, no torch).

Names map one-to-one: the flax path ``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel``
is the PyTorch tensor ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight``.
Layouts: ``nn.Linear`` ``[out, in]`` <-> flax ``[in, out]``; ``nn.Conv2d`` ``[out, in, kh, kw]`` <->
flax ``[kh, kw, in, out]``; norms' ``weight`` <-> ``scale``; embeddings' ``weight`` <-> ``embedding``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["torch_name", "params_to_torch_state_dict", "torch_state_dict_to_params", "read_json",
           "load_safetensors_folder", "save_safetensors_folder", "check_config_fields"]

# Container modules PyTorch indexes with ``.N`` (ModuleList / Sequential); flax names them ``<name>_N``.
_INDEXED = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net|layers)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def torch_name(path: Tuple[str, ...]) -> str:
    """flax param path -> PyTorch state-dict key."""
    parts = []
    for p in path[:-1]:
        m = _INDEXED.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    parts.append(_LEAF.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_torch(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if leaf == "kernel" and a.ndim == 2:
        return np.ascontiguousarray(a.T)
    return a


def _from_torch(leaf: str, a: np.ndarray, want: Tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and len(want) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
        a = a[:, :, 0, 0]  # a 1x1 conv stored where diffusers now has a Linear (old VAE attention)
    if leaf == "kernel" and a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def params_to_torch_state_dict(params: Any) -> Dict[str, np.ndarray]:
    """Flax params -> PyTorch-layout state dict (numpy)."""
    return {torch_name(p): _to_torch(p[-1], np.asarray(jax.device_get(v)))
            for p, v in flatten_dict(dict(params)).items()}


def torch_state_dict_to_params(
    state_dict: Dict[str, np.ndarray],
    template: Any,
    *,
    what: str,
    ignore: Sequence[str] = (),
    rename: Sequence[Tuple[str, str]] = (),
    dtype: Any = jnp.float32,
) -> Any:
    """Fill ``template`` (a params tree of shapes, e.g. from ``jax.eval_shape(module.init, ...)``)
    from a PyTorch-layout ``state_dict``. ``ignore``: regexes of keys to skip; ``rename``:
    ``(regex, replacement)`` applied to keys first (legacy names). Raises on a missing key, an
    unexpected key, or a shape mismatch, naming the key and ``what`` (e.g. ``"unet"``)."""
    sd = {}
    for k, v in state_dict.items():
        for pat, rep in rename:
            k = re.sub(pat, rep, k)
        if any(re.search(p, k) for p in ignore):
            continue
        sd[k] = v
    out, used = {}, set()
    for path, leaf in flatten_dict(dict(template)).items():
        name = torch_name(path)
        if name not in sd:
            raise ValueError(f"{what}: checkpoint lacks {name!r} (flax {'/'.join(path)}); is it a checkpoint of "
                             f"this config?")
        a = _from_torch(path[-1], np.asarray(sd[name]), tuple(leaf.shape))
        if tuple(a.shape) != tuple(leaf.shape):
            raise ValueError(f"{what}: {name!r} has shape {tuple(np.asarray(sd[name]).shape)} in the checkpoint; the "
                             f"config expects {tuple(leaf.shape)} (flax layout).")
        out[path] = jnp.asarray(a, dtype)
        used.add(name)
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{what}: checkpoint has {len(extra)} tensors this module does not use, e.g. {extra[:5]}; "
                         "the config and the weights disagree.")
    return unflatten_dict(out)


def read_json(folder: str, name: str) -> Dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass a local diffusers pipeline folder "
                                "(StableDiffusionPipeline.save_pretrained) or a model folder holding it.")
    with open(path) as f:
        return json.load(f)


def load_safetensors_folder(folder: str, names: Iterable[str] = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS)
                            ) -> Dict[str, np.ndarray]:
    """All tensors of ``folder``'s safetensors weights (single file or sharded with an index)."""
    from safetensors.numpy import load_file

    for name in names:
        single, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
        if os.path.isfile(single):
            return dict(load_file(single))
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd: Dict[str, np.ndarray] = {}
            for s in shards:
                sd.update(load_file(os.path.join(folder, s)))
            return sd
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"No safetensors weights ({', '.join(names)}) in {folder} (it holds {present}); rljax reads safetensors only: "
        "re-save the pipeline with save_pretrained(..., safe_serialization=True).")


def save_safetensors_folder(folder: str, params: Any, config: Dict[str, Any], *, weights_name: str,
                            config_name: str = "config.json", extra: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write ``config`` and ``params`` (PyTorch layout, PyTorch names) to ``folder``."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    sd = params_to_torch_state_dict(params)
    sd.update(extra or {})
    save_file(sd, os.path.join(folder, weights_name), metadata={"format": "pt"})
    with open(os.path.join(folder, config_name), "w") as f:
        json.dump(config, f, indent=2)


def check_config_fields(what: str, config: Dict[str, Any], supported: Iterable[str],
                        default_only: Dict[str, Tuple[Any, ...]]) -> None:
    """Raise naming the first config field rljax does not implement: an unknown field, or a
    ``default_only`` field whose value is not one of its allowed values. Keys starting with
    ``_`` (``_class_name``, ``_diffusers_version``) are metadata and pass."""
    supported = set(supported)
    for k, v in config.items():
        if k.startswith("_") or k in supported:
            continue
        if k in default_only:
            allowed = default_only[k]
            vals = v if isinstance(v, (list, tuple)) and not any(isinstance(a, (list, tuple)) for a in allowed) else [v]
            if all(x in allowed for x in vals):
                continue
            raise ValueError(f"{what} config field {k}={v!r} is not supported by rljax (supported: {allowed}).")
        raise ValueError(f"{what} config field {k!r} is unknown to rljax's implementation; remove it or use a "
                         "config rljax supports.")
