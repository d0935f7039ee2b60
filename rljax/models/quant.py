"""Weight-only quantization of a frozen base model: int8 and 4-bit NormalFloat (NF4).

What TRL users get from ``load_in_8bit`` / ``load_in_4bit`` (bitsandbytes): the frozen
base's linear weights are stored in 8 or 4 bits (+ scales) and dequantized on the fly,
while LoRA adapters (``rljax.models.peft``) train in float. Here a quantized weight is a
:class:`QuantizedArray` pytree leaf-group in the params tree, in place of a Dense
``kernel``; ``rljax.models.peft.LoraModel`` dequantizes it inside the jitted forward, right
before the matmul that reads it (weights never exist in float outside that forward).

Formats (weights ``w [..., in, out]``, the flax Dense layout; a leading layer axis of a
scanned stack is allowed):

- ``"int8"``: symmetric per-output-channel absmax, ``codes = round(w / s)`` in int8 with
  ``s = max|w[..., :, j]| / 127`` (float32 ``[..., 1, out]``). LLM.int8's outlier
  decomposition is not reproduced (a weight-only scheme; activations stay float).
  ~4x fewer bytes than float32 (2x fewer than bfloat16).
- ``"nf4"``: QLoRA's NormalFloat-4 with blocks of 64 values: each block's absmax (float32)
  scales it to [-1, 1], each value is the nearest of the 16 NF4 levels (two 4-bit codes per
  uint8). ~0.5625 bytes per value, ~7x fewer than float32. Double quantization of the
  absmax (``bnb_4bit_use_double_quant``) is not implemented.

Which leaves: the ``kernel`` of every Dense layer with at least 2 axes, except the heads
(``lm_head``/``embed_out``, ``score``, ``v_head``) that bitsandbytes also leaves in float
(``llm_int8_skip_modules``); embeddings and norms stay float as in bitsandbytes.

Why not qwix (Google's JAX quantization library, which has QLoRA): evaluated (qwix 0.1.8). It
intercepts ``dot_general`` inside flax modules and keeps its LoRA params and quantized
weights inside each module's own scope (``kernel_lora_a`` beside ``kernel``), with no switch to
run the same params with adapters off (TRL's PEFT reference model) and no PEFT file format; the
rljax wrapper needs those, needs the frozen tree and the adapters apart for the optimizer, and
already intercepts Dense calls for LoRA. Quantizing a weight is ~60 lines here, so rljax keeps
no extra runtime dependency for it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QUANTIZATION_KINDS",
    "NF4_LEVELS",
    "QuantizedArray",
    "quantize",
    "quantize_params",
    "dequantize_params",
    "is_quantized",
    "param_bytes",
]

QUANTIZATION_KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, bitsandbytes' NF4 table).
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)
SKIPPED_MODULES = ("lm_head", "embed_out", "score", "v_head")


@flax.struct.dataclass
class QuantizedArray:
    """A weight stored quantized. ``codes``: int8 ``[..., in, out]`` (int8) or uint8
    ``[..., n_blocks, 32]`` (nf4, two codes per byte); ``scale``: float32 ``[..., 1, out]``
    (int8) or ``[..., n_blocks, 1]`` (nf4). ``...`` is any leading axis (a scanned layer stack,
    which ``nn.scan`` slices like any param). Static: ``kind``, ``matrix_shape`` (the last two
    axes of the float weight) and ``dtype`` (its float dtype)."""

    codes: jax.Array
    scale: jax.Array
    kind: str = flax.struct.field(pytree_node=False)
    matrix_shape: Tuple[int, int] = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.codes.shape[:-2]) + tuple(self.matrix_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.codes.shape)) * self.codes.dtype.itemsize + int(np.prod(self.scale.shape)) * 4

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float weight ``[*shape]`` in ``dtype`` (default: the original dtype). Jittable."""
        dtype = dtype or self.dtype
        if self.kind == "int8":
            return (self.codes.astype(jnp.float32) * self.scale).astype(dtype)
        lead = tuple(self.codes.shape[:-2])
        idx = jnp.stack([self.codes & 0x0F, self.codes >> 4], axis=-1).reshape(*self.codes.shape[:-1], -1)
        values = (jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)] * self.scale).reshape(*lead, -1)
        n = int(np.prod(self.matrix_shape))
        return values[..., :n].reshape(self.shape).astype(dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def quantize(w: jax.Array, kind: str) -> QuantizedArray:
    """Quantize one float weight ``w [..., in, out]`` (see the module docstring)."""
    if kind not in QUANTIZATION_KINDS:
        raise ValueError(f"quantization={kind!r}: choose one of {QUANTIZATION_KINDS}.")
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"quantize expects a weight matrix [..., in, out], got shape {tuple(w.shape)}.")
    dtype, lead, matrix = w.dtype, tuple(w.shape[:-2]), tuple(w.shape[-2:])
    x = w.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(x), axis=-2, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return QuantizedArray(codes, scale, kind, matrix, dtype)
    flat = x.reshape(*lead, -1)
    pad = (-flat.shape[-1]) % NF4_BLOCK
    blocks = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    idx = jnp.argmin(jnp.abs((blocks / absmax)[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
    pairs = idx.reshape(*idx.shape[:-1], -1, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)
    return QuantizedArray(codes, absmax, kind, matrix, dtype)


def _quantizable(path: Tuple[str, ...], leaf: Any, skip: Sequence[str]) -> bool:
    return (
        path[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating) and not any(p in skip for p in path[:-1])
    )


def quantize_params(params: Any, kind: str, skip: Sequence[str] = SKIPPED_MODULES) -> Any:
    """``params`` with every Dense ``kernel`` (outside ``skip`` module names) replaced by a
    :class:`QuantizedArray`; ``kind`` is "int8" or "nf4"; LoRA leaves stay as they are."""
    if kind not in QUANTIZATION_KINDS:
        raise ValueError(f"quantization={kind!r}: choose one of {QUANTIZATION_KINDS}, or None for float weights.")
    quantize_jit = jax.jit(quantize, static_argnums=1)

    def visit(path, leaf):
        names = tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)
        return quantize_jit(leaf, kind) if _quantizable(names, leaf, skip) else leaf

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def dequantize_params(params: Any, dtype: Optional[Any] = None) -> Any:
    """``params`` with every :class:`QuantizedArray` turned back into a float array."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def param_bytes(params: Any) -> int:
    """Bytes the params occupy (quantized codes and scales included); works on
    ``jax.ShapeDtypeStruct`` trees from ``jax.eval_shape`` too."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))
