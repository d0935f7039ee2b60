"""One device mesh, regex partition rules, and the helpers that put pytrees on it.

rljax shards with GSPMD: arrays carry ``NamedSharding``s and ``jax.jit`` gets
``in_shardings``/``out_shardings``; the compiler inserts the collectives. There is
no ``pmap`` and no per-device code: the pure steps in ``rljax.trainers.base``,
``rljax.ppo_train``, ``rljax.dpo`` and ``rljax.generation`` run unchanged on 1
device, on a mesh of simulated CPU devices, or across hosts.

The mesh has three named axes (sizes multiply to the device count)::

    data   plain data parallelism: batch split, params replicated
    fsdp   batch split AND the large dim of every matrix split (ZeRO-3 / FSDP)
    model  tensor parallelism: attention heads and the MLP hidden dim split

Parameters get a ``PartitionSpec`` from the first rule whose regex matches their
'/'-joined path (``transformer/h_0/attn/c_attn/kernel``), as in EasyLM. Rules are
searched with ``re.search``, so the same table covers ``params/...``,
``ref_params/...`` and the optimizer's moments (``opt_state/0/mu/transformer/...``),
which mirror the params. A rule's value is a ``PartitionSpec`` or a tuple of
candidate specs (the first whose mesh axes divide every dim wins). When none fits,
the first is relaxed: each dim its axes do not divide is replicated, so tiny test
models (and odd vocabularies) never fail to shard.

The pattern every trainer uses::

    mesh = make_mesh(data=-1, fsdp=1, model=1)
    state = shard_params(state, mesh)                     # any pytree: params, TrainState, ...
    state_sh = state_shardings(state, mesh)
    step = jit_sharded(make_train_step(loss_fn), mesh,
                       in_shardings=(state_sh, batch_sharding(mesh)),
                       out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    state, metrics = step(state, shard_batch(batch, mesh))
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[Tuple[str, Any]]


class _FSDPLargest:
    """Rule value: shard the largest dim divisible by the ``fsdp`` axis on ``fsdp``
    (matrices only; vectors and scalars are replicated). The fallback for unknown models."""

    def __repr__(self) -> str:
        return "FSDP_LARGEST"


FSDP_LARGEST = _FSDPLargest()

# Heads of PPO / reward models are tiny and read by every device: replicate.
_HEAD_RULES = [
    (r"(^|/)(v_head|value_head|score|summary)/", P()),
]

# GPT-2: Dense kernels are [in, out] (HF Conv1D layout); c_attn's out is [q | k | v].
GPT2_RULES = _HEAD_RULES + [
    # [vocab, hidden]: vocab on model, hidden on fsdp; odd vocabs (50257) shard hidden on both
    (r"wte/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),
    (r"wpe/embedding$", (P(None, "fsdp"), P(None, ("fsdp", "model")))),  # [positions, hidden]
    (r"attn/c_attn/kernel$", P("fsdp", "model")),  # [hidden, 3*hidden]: heads on model
    (r"attn/c_attn/bias$", P("model")),
    (r"attn/c_proj/kernel$", P("model", "fsdp")),  # [hidden, hidden]: input features = heads
    (r"mlp/c_fc/kernel$", P("fsdp", "model")),  # [hidden, inner]
    (r"mlp/c_fc/bias$", P("model")),
    (r"mlp/c_proj/kernel$", P("model", "fsdp")),  # [inner, hidden]
    (r"lm_head/kernel$", P("fsdp", "model")),  # [hidden, vocab] (untied models only)
    (r".*", P()),  # layer norms, output biases
]

# Llama / Mistral / Qwen2: flax kernels are [in, out] (transposed from nn.Linear on load).
LLAMA_RULES = _HEAD_RULES + [
    (r"embed_tokens/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, hidden]
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "model")),  # [hidden, heads*head_dim]
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("model")),
    (r"self_attn/o_proj/kernel$", P("model", "fsdp")),  # [heads*head_dim, hidden]
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "model")),  # [hidden, intermediate]
    (r"mlp/(gate_proj|up_proj)/bias$", P("model")),
    (r"mlp/down_proj/kernel$", P("model", "fsdp")),  # [intermediate, hidden]
    (r"lm_head/kernel$", P("fsdp", "model")),  # [hidden, vocab]
    (r".*", P()),  # RMSNorm weights, o_proj/down_proj biases
]

# GPT-NeoX / Pythia: kernels [in, out]; query_key_value's out is [heads, 3 * head_dim] (per-head q|k|v),
# so splitting it on "model" splits whole heads when the axis divides num_attention_heads.
GPT_NEOX_RULES = _HEAD_RULES + [
    (r"embed_in/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, hidden]
    (r"attention/query_key_value/kernel$", P("fsdp", "model")),  # [hidden, 3*hidden]
    (r"attention/query_key_value/bias$", P("model")),
    (r"attention/dense/kernel$", P("model", "fsdp")),  # [hidden, hidden]: input features = heads
    (r"mlp/dense_h_to_4h/kernel$", P("fsdp", "model")),  # [hidden, intermediate]
    (r"mlp/dense_h_to_4h/bias$", P("model")),
    (r"mlp/dense_4h_to_h/kernel$", P("model", "fsdp")),  # [intermediate, hidden]
    (r"embed_out/kernel$", P("fsdp", "model")),  # [hidden, vocab]
    (r".*", P()),  # layer norms, output biases
]

# GPT-J / CodeGen: kernels [in, out]. CodeGen's fused qkv_proj out is [4 chunks, (q|v|k), heads/4 * head_dim],
# so splitting it on "model" (2 or 4 ways) keeps each chunk's q, v, k together.
GPTJ_RULES = _HEAD_RULES + [
    (r"wte/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, hidden]
    (r"attn/(q_proj|k_proj|v_proj|qkv_proj)/kernel$", P("fsdp", "model")),  # [hidden, heads*head_dim]
    (r"attn/out_proj/kernel$", P("model", "fsdp")),  # [hidden, hidden]: input features = heads
    (r"mlp/fc_in/kernel$", P("fsdp", "model")),  # [hidden, inner]
    (r"mlp/fc_in/bias$", P("model")),
    (r"mlp/fc_out/kernel$", P("model", "fsdp")),  # [inner, hidden]
    (r"lm_head/kernel$", P("fsdp", "model")),  # [hidden, vocab]
    (r"lm_head/bias$", P("model")),
    (r".*", P()),  # layer norms, output biases
]

# OPT: kernels [in, out]; embed_tokens is [vocab, word_embed_proj_dim], project_in/out map that width
# to and from hidden_size (FSDP on their larger dim).
OPT_RULES = _HEAD_RULES + [
    (r"embed_tokens/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, proj]
    (r"embed_positions/embedding$", (P(None, "fsdp"), P(None, ("fsdp", "model")))),  # [positions + 2, hidden]
    (r"project_(in|out)/kernel$", FSDP_LARGEST),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "model")),  # [hidden, hidden]: heads on model
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("model")),
    (r"self_attn/out_proj/kernel$", P("model", "fsdp")),
    (r"fc1/kernel$", P("fsdp", "model")),  # [hidden, ffn_dim]
    (r"fc1/bias$", P("model")),
    (r"fc2/kernel$", P("model", "fsdp")),  # [ffn_dim, hidden]
    (r"lm_head/kernel$", P("fsdp", "model")),  # [proj, vocab] (untied models only)
    (r".*", P()),  # layer norms, output biases
]

# GPT-Neo: GPT-2's table (its c_fc/c_proj kernels are [in, out] once loaded) plus separate q/k/v/out projections.
GPT_NEO_RULES = _HEAD_RULES + [
    (r"attn/attention/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "model")),  # [hidden, hidden]
    (r"attn/attention/out_proj/kernel$", P("model", "fsdp")),
] + GPT2_RULES[len(_HEAD_RULES):]

# BLOOM: kernels [in, out]; query_key_value's out is [heads, 3, head_dim], so "model" splits whole heads.
BLOOM_RULES = _HEAD_RULES + [
    (r"word_embeddings/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, hidden]
    (r"self_attention/query_key_value/kernel$", P("fsdp", "model")),  # [hidden, 3*hidden]
    (r"self_attention/query_key_value/bias$", P("model")),
    (r"self_attention/dense/kernel$", P("model", "fsdp")),  # [hidden, hidden]: input features = heads
    (r"mlp/dense_h_to_4h/kernel$", P("fsdp", "model")),  # [hidden, 4*hidden]
    (r"mlp/dense_h_to_4h/bias$", P("model")),
    (r"mlp/dense_4h_to_h/kernel$", P("model", "fsdp")),  # [4*hidden, hidden]
    (r".*", P()),  # layer norms, output biases
]

# T5 / mT5 (encoder-decoder): kernels [in, out]; q/k/v out and o's in are [heads * d_kv], so "model"
# splits whole heads, as does the relative position bias [buckets, heads]; wi / wi_0 / wi_1 are
# [d_model, d_ff], wo [d_ff, d_model]. Encoder and decoder blocks share the table.
T5_RULES = _HEAD_RULES + [
    (r"shared/embedding$", (P("model", "fsdp"), P(None, ("fsdp", "model")))),  # [vocab, d_model]
    (r"(SelfAttention|EncDecAttention)/(q|k|v)/kernel$", P("fsdp", "model")),  # [d_model, heads*d_kv]
    (r"(SelfAttention|EncDecAttention)/o/kernel$", P("model", "fsdp")),  # [heads*d_kv, d_model]
    (r"relative_attention_bias/embedding$", P(None, "model")),  # [buckets, heads]
    (r"DenseReluDense/(wi|wi_0|wi_1)/kernel$", P("fsdp", "model")),  # [d_model, d_ff]
    (r"DenseReluDense/wo/kernel$", P("model", "fsdp")),  # [d_ff, d_model]
    (r"lm_head/kernel$", P("fsdp", "model")),  # [d_model, vocab] (untied: v1.1 / flan-t5 / mT5)
    (r".*", P()),  # layer norms
]

# Unknown models: FSDP on the largest dim of every matrix, nothing else.
GENERIC_RULES = _HEAD_RULES + [(r".*", FSDP_LARGEST)]

RULES = {"gpt2": GPT2_RULES, "llama": LLAMA_RULES, "mistral": LLAMA_RULES, "qwen2": LLAMA_RULES,
         "gpt_neox": GPT_NEOX_RULES, "opt": OPT_RULES}
RULES.update(gemma=LLAMA_RULES, gptj=GPTJ_RULES, codegen=GPTJ_RULES, gpt_neo=GPT_NEO_RULES, bloom=BLOOM_RULES)
RULES.update(t5=T5_RULES, mt5=T5_RULES)


# --------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with axes ("data", "fsdp", "model") over ``devices`` (default: all, every process).

    One size may be -1 ("the rest"). Devices are laid out process-major, so on several
    hosts each process's devices hold a contiguous block of the ``data`` axis.
    Raises ValueError when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp), int(model)]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}, model={model}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive (or -1 for 'the rest'), got data={data}, fsdp={fsdp}, model={model}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"Cannot build a mesh with data={data}, fsdp={fsdp}, model={model} on {n} devices: "
                f"{known} does not divide {n}."
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x model={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n} are available; the sizes must multiply to the device count (use -1 for 'the rest')."
        )
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = None
    if devices[0].platform != "cpu":  # physical topology-aware layout where the backend knows one
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(sizes, devices)
        except Exception:  # noqa: BLE001  (unknown topology: plain reshape below)
            grid = None
    if grid is None:
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, AXES)


def mesh_shape(mesh: Mesh) -> Tuple[int, int, int]:
    """(data, fsdp, model) sizes of an rljax mesh."""
    return tuple(int(mesh.shape[a]) for a in AXES)


# --------------------------------------------------------------------------
# Partition rules
# --------------------------------------------------------------------------


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Tuple[Any, ...]) -> str:
    """A ``tree_flatten_with_path`` key path as 'a/b/0/c'."""
    return "/".join(_key_name(k) for k in path)


def tree_paths(tree: Any) -> list:
    """'/'-joined paths of every leaf of ``tree`` (flatten order)."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def infer_family(tree: Any) -> Optional[str]:
    """A ``RULES`` key ("gpt2", "llama", ...) or None, from the parameter names found anywhere in ``tree``."""
    # a scanned layer stack (h/..., layers/...) reads like its first layer
    joined = re.sub(r"(^|/)(h|layers)/", r"\1\2_0/", "\n".join(tree_paths(tree)), flags=re.M)
    if re.search(r"(^|/)(encoder|decoder)/block_\d+/layer_0/SelfAttention/", joined, re.M):  # T5 / mT5
        return "t5"
    if re.search(r"(^|/)h_\d+/attn/(q_proj|qkv_proj)/", joined, re.M):  # before gpt2: same wte name
        return "gptj"
    if re.search(r"(^|/)h_\d+/attn/attention/q_proj/", joined, re.M):
        return "gpt_neo"
    if re.search(r"(^|/)(h_\d+/self_attention/query_key_value|word_embeddings/embedding)", joined, re.M):
        return "bloom"
    if re.search(r"(^|/)(h_\d+/attn/c_attn|wte/embedding)", joined, re.M):
        return "gpt2"
    if re.search(r"(^|/)(layers_\d+/attention/query_key_value|embed_in/embedding)", joined, re.M):
        return "gpt_neox"
    if re.search(r"(^|/)(decoder/embed_positions|layers_\d+/fc1)/", joined, re.M):  # before llama: same q_proj
        return "opt"
    if re.search(r"(^|/)(layers_\d+/self_attn/q_proj|embed_tokens/embedding)", joined, re.M):
        return "llama"
    return None


def default_rules(tree: Any) -> Rules:
    """The rule table of the model family whose params ``tree`` holds (generic FSDP if unknown)."""
    family = infer_family(tree)
    return RULES[family] if family else GENERIC_RULES


def _axis_size(mesh: Mesh, axes: Union[None, str, Tuple[str, ...]]) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(int(mesh.shape[a]) for a in names)


def fit_spec(spec: Any, shape: Tuple[int, ...], mesh: Mesh, path: str = "") -> P:
    """``spec`` relaxed for an array of ``shape``: every dim whose mesh axes do not divide it
    (or whose axes the mesh lacks) is replicated. Scalars are always replicated."""
    shape = tuple(shape)
    if len(shape) == 0:
        return P()
    if spec is FSDP_LARGEST:
        n = int(mesh.shape.get("fsdp", 1))
        if len(shape) < 2 or n == 1:
            return P()
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if shape[i] % n == 0:
                return P(*[("fsdp" if j == i else None) for j in range(len(shape))])
        return P()
    entries = list(spec)
    if len(entries) > len(shape):
        raise ValueError(
            f"Partition rule {spec} has {len(entries)} dims but {path or 'the array'} has shape {shape}; "
            "make the rule's regex more specific (e.g. end it with 'kernel$')."
        )
    entries += [None] * (len(shape) - len(entries))
    out = []
    for dim, axes in zip(shape, entries):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if any(a not in mesh.shape for a in names) or dim % _axis_size(mesh, axes):
            axes = None
        out.append(axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _fits(spec: P, shape: Tuple[int, ...], mesh: Mesh) -> bool:
    entries = list(spec)
    return len(entries) <= len(shape) and all(
        axes is None or (all(a in mesh.shape for a in ((axes,) if isinstance(axes, str) else axes)) and dim % _axis_size(mesh, axes) == 0)
        for dim, axes in zip(shape, entries)
    )


def match_spec(path: str, shape: Tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
    """The (fitted) spec of the first rule whose regex ``re.search``-es ``path``; replicate if none.
    A rule value that is a tuple of specs picks the first that fits ``shape`` exactly."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if isinstance(spec, tuple) and not isinstance(spec, P):
                spec = next((c for c in spec if _fits(c, shape, mesh)), spec[0])
            return fit_spec(spec, shape, mesh, path)
    return P()


def _shape(x: Any) -> Optional[Tuple[int, ...]]:
    return tuple(x.shape) if hasattr(x, "shape") else None


def partition_specs(tree: Any, mesh: Mesh, rules: Optional[Rules] = None) -> Any:
    """``PartitionSpec`` pytree for ``tree`` (arrays or ``jax.ShapeDtypeStruct``s)."""
    rules = default_rules(tree) if rules is None else rules

    def spec(path, x):
        shape = _shape(x)
        if shape is None:
            return P()
        name = path_str(path)
        if len(shape) and re.search(r"(^|/)(h|layers)/", name):  # scanned layers: [layer, ...] stays whole
            return P(None, *match_spec(name, shape[1:], mesh, rules))
        return match_spec(name, shape, mesh, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(params: Any, mesh: Mesh, rules: Optional[Rules] = None) -> Any:
    """``NamedSharding`` pytree for ``params`` (real or abstract), from ``rules``
    (default: the family's table, see ``default_rules``)."""
    specs = partition_specs(params, mesh, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: Any, mesh: Mesh, rules: Optional[Rules] = None) -> Any:
    """``NamedSharding`` pytree for a whole train state (``TrainState``, ``PPOTrainState``, a dict...).

    Rules match anywhere in a path, so params, reference params and optimizer moments
    that mirror params (``opt_state/.../mu/<param path>``) get the params' shardings;
    scalars (step, Adam's count, the KL coefficient, running moments) and the PRNG key
    are replicated. Static fields (``tx``) are untouched.
    """
    return param_shardings(state, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (use for metrics and scalars)."""
    return NamedSharding(mesh, P())


def _place(x: Any, sharding: NamedSharding, copy: bool = False) -> jax.Array:
    """Put one (host or device) array on ``sharding``; works when the sharding spans several
    processes, provided every process passes the same global value."""
    if x is None:
        return None
    if isinstance(x, jax.Array) and x.sharding == sharding and not copy:
        return x
    if sharding.is_fully_addressable:
        if copy and isinstance(x, jax.Array):
            x = jnp.array(x, copy=True)  # a private buffer (device_put may alias device 0's shard)
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params: Any, mesh: Mesh, rules: Optional[Rules] = None, *, copy: bool = False) -> Any:
    """``params`` (or any state pytree) placed on ``mesh`` according to ``rules``
    (default: the family's table, detected from the param names).

    Like ``jax.device_put``, the result may share device buffers with the input, so
    passing it to a step that donates its state also invalidates ``params``; pass
    ``copy=True`` when you keep using the input.
    """
    shardings = param_shardings(params, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: _place(x, s, copy), params, shardings)


def shard_state(state: Any, mesh: Mesh, rules: Optional[Rules] = None, *, copy: bool = False) -> Any:
    """Alias of ``shard_params`` for whole train states (reads better at call sites)."""
    return shard_params(state, mesh, rules, copy=copy)


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: Optional[int] = None) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"), other axes replicated.
    Usable as a pytree prefix for a whole batch dict in ``in_shardings``."""
    spec = P(BATCH_AXES) if ndim is None else P(BATCH_AXES, *([None] * (ndim - 1)))
    return NamedSharding(mesh, spec)


def batch_size_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (data x fsdp)."""
    return _axis_size(mesh, BATCH_AXES)


def ambient_mesh() -> Optional[Any]:
    """The mesh set by ``jit_sharded`` / ``jax.set_mesh`` around the current trace (an
    ``AbstractMesh`` while tracing), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _batch_axes_for(mesh: Any, rows: int) -> Optional[Union[str, Tuple[str, ...]]]:
    """The widest of ("data", "fsdp"), "data", "fsdp" present in ``mesh`` with size > 1 that
    divides ``rows`` (None: the rows cannot be split)."""
    names = [a for a in BATCH_AXES if a in mesh.shape and int(mesh.shape[a]) > 1]
    for cand in ([tuple(names)] if len(names) > 1 else []) + [(a,) for a in names]:
        if rows % math.prod(int(mesh.shape[a]) for a in cand) == 0:
            return cand if len(cand) > 1 else cand[0]
    return None


def constrain_batch(tree: Any, mesh: Optional[Any] = None, batch_axis: int = 0) -> Any:
    """Keep the batch axis of every array in ``tree`` split over ("data", "fsdp").

    A ``with_sharding_constraint`` per leaf: dim ``batch_axis`` on the batch axes (or on
    "data" / "fsdp" alone when only one divides it), every other dim left to the compiler
    (``PartitionSpec.UNCONSTRAINED``, so e.g. attention heads may stay on "model"). Used
    inside the pure steps where an op would otherwise drop the batch sharding (a gather of
    permuted rows, a microbatch reshape, a concatenation): without it XLA may replicate the
    rows and every device does the whole batch's work. ``mesh`` defaults to the ambient mesh
    (``jit_sharded``); with neither, and for leaves with fewer than ``batch_axis + 1`` dims or
    rows no batch axis divides, the leaf is returned unchanged. Jittable; any pytree.
    """
    mesh = ambient_mesh() if mesh is None else mesh
    if mesh is None:
        return tree

    def put(x):
        if x is None or not hasattr(x, "shape") or len(x.shape) <= batch_axis:
            return x
        axes = _batch_axes_for(mesh, int(x.shape[batch_axis]))
        if axes is None:
            return x
        spec = P(*([P.UNCONSTRAINED] * batch_axis), axes, *([P.UNCONSTRAINED] * (len(x.shape) - batch_axis - 1)))
        target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
        return jax.lax.with_sharding_constraint(x, target)

    return jax.tree_util.tree_map(put, tree)


def _check_batch_dim(x: Any, mesh: Mesh, path: str) -> None:
    n = batch_size_divisor(mesh)
    if x.shape[0] % n:
        raise ValueError(
            f"Batch leaf {path or '<root>'} has leading dim {x.shape[0]}, not a multiple of data x fsdp = {n}; "
            f"pad the batch or pick a batch size divisible by {n}."
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a GLOBAL batch (every process holds the same whole batch) on ``mesh``:
    leading axis over ("data", "fsdp"); scalars replicated. For per-process shards use
    ``make_global_batch``."""

    def put(path, x):
        if x is None:
            return None
        if np.ndim(x) == 0:
            return _place(x, replicated(mesh))
        _check_batch_dim(x, mesh, path_str(path))
        return _place(x, batch_sharding(mesh))

    return jax.tree_util.tree_map_with_path(put, batch)


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble a global batch from each process's own rows (multi-host data loading).

    Every process passes its ``[local_batch, ...]`` leaves (the same shapes everywhere);
    the result's leaves are ``[local_batch * process_count, ...]``, split over ("data",
    "fsdp"), process ``p`` owning rows ``p*local_batch : (p+1)*local_batch`` (the mesh from
    ``make_mesh`` is process-major). On one process this equals ``shard_batch``.
    """
    sharding = batch_sharding(mesh)

    def put(path, x):
        if x is None:
            return None
        x = np.asarray(x)
        if x.ndim == 0:
            return _place(x, replicated(mesh))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, local_batch)


# --------------------------------------------------------------------------
# jit
# --------------------------------------------------------------------------


def jit_sharded(
    fn: Callable,
    mesh: Mesh,
    in_shardings: Any,
    out_shardings: Any = None,
    donate_argnums: Union[int, Sequence[int]] = (),
    static_argnums: Union[int, Sequence[int]] = (),
) -> Callable:
    """``jax.jit(fn, in_shardings, out_shardings, donate_argnums)`` that also makes ``mesh``
    the ambient mesh while tracing, so ``with_sharding_constraint`` with bare
    ``PartitionSpec``s works inside ``fn``. ``fn`` may itself be jitted (rljax's step
    builders return jitted functions; the inner jit is inlined). ``out_shardings=None``
    lets the compiler choose."""
    jitted = jax.jit(
        fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums,
        static_argnums=static_argnums,
    )

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return jitted(*args, **kwargs)

    def lower(*args, **kwargs):
        with jax.set_mesh(mesh):  # the ambient mesh that constrain_batch reads while tracing
            return jitted.lower(*args, **kwargs)

    call.jitted = jitted
    call.lower = lower  # call.lower(*args).compile().cost_analysis(): per-device work
    call.__doc__ = getattr(fn, "__doc__", None)
    call.__wrapped__ = fn
    return call


def constrain(x: Any, mesh: Mesh, spec: Union[P, Any]) -> Any:
    """``jax.lax.with_sharding_constraint`` with an explicit mesh (a spec or a spec pytree)."""
    if isinstance(spec, P):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P))
    return jax.lax.with_sharding_constraint(x, shardings)


# --------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------


def per_device_bytes(tree: Any, device: Optional[Any] = None) -> int:
    """Bytes of ``tree``'s arrays stored on ``device`` (default: the first local device).
    Works on real arrays (addressable shards) and on ``ShapeDtypeStruct``s with a sharding."""
    device = jax.local_devices()[0] if device is None else device
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
        elif hasattr(x, "sharding") and x.sharding is not None:
            idx = x.sharding.devices_indices_map(tuple(x.shape)).get(device)
            if idx is not None:
                shard = x.sharding.shard_shape(tuple(x.shape))
                total += math.prod(shard) * np.dtype(x.dtype).itemsize
        elif hasattr(x, "shape"):
            total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return total
