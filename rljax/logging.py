"""Metric sinks: stdout/tqdm, JSONL, TensorBoard, Weights & Biases, behind one ``MetricLogger``.

Metrics are computed inside jit and logged outside it (Levanter-style): a training loop
hands ``MetricLogger.log(stats, step)`` the dict it got back from a jitted step, with
TRL's slash-separated names (``objective/kl``, ``ppo/loss/policy``, ``env/reward_mean``,
``rewards/margins``, ...). Each value is one of:

* a scalar (python number, numpy/JAX 0-d array or size-1 array): every sink logs it;
* an array with more than one element (``env/reward_dist``, ``objective/logprobs``,
  ``ppo/policy/advantages``, ...): TensorBoard and W&B get a histogram; JSONL and stdout
  get a summary ``{name}/mean``, ``/std``, ``/min``, ``/max`` (``arrays="summary"``,
  default) or nothing (``arrays="drop"``);
* anything else (strings, None, objects): ignored.

``log_samples(rows, step)`` records a table of generations (TRL's ``game_log``:
query / response / reward) every ``sample_every`` steps: ``samples.jsonl`` and
``samples.md`` in ``output_dir``, a text panel in TensorBoard, a ``wandb.Table``.

Optional back-ends are imported only when a sink that needs them is created, and a
missing one raises an ``ImportError`` naming the ``pip install``. W&B runs offline with
``WANDB_MODE=offline`` (nothing leaves the machine; ``wandb sync`` uploads later).

Sink names (``MetricLogger(sinks=...)``, ``PPOConfig.log_with``, ``TrainingArguments.report_to``):
``"stdout"`` (alias ``"tqdm"``), ``"jsonl"``, ``"tensorboard"``, ``"wandb"``; ``"all"``
means stdout + jsonl + every optional back-end that is installed; ``"none"`` none.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "SINK_NAMES",
    "MetricLogger",
    "StdoutSink",
    "JsonlSink",
    "TensorBoardSink",
    "WandbSink",
    "split_stats",
    "summarize_array",
    "resolve_sink_names",
]

SINK_NAMES = ("stdout", "jsonl", "tensorboard", "wandb")
_ALIASES = {"tqdm": "stdout", "console": "stdout", "tensorboardx": "tensorboard", "tb": "tensorboard", "json": "jsonl"}
_INSTALL = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),
    "wandb": ("wandb", "pip install wandb"),
}


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def _as_numpy(value: Any) -> Optional[np.ndarray]:
    """Numeric numpy view of ``value`` (JAX arrays are fetched), or None when it is not numeric."""
    if isinstance(value, (bool, np.bool_)):
        return np.asarray(float(value))
    if isinstance(value, (int, float, np.number)):
        return np.asarray(value)
    if type(value).__module__.startswith(("jax", "jaxlib")) or hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - not array-like after all
            return None
        if arr.dtype.kind in "biuf":
            return arr
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, np.number)) for v in value):
        return np.asarray(value, dtype=np.float64)
    return None


def split_stats(stats: Mapping[str, Any]) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """``(scalars, arrays)``: size-1 numeric values as floats, larger numeric arrays as numpy.

    Non-numeric values are left out of both. Keys keep their names (TRL's stat names).
    """
    scalars: Dict[str, float] = {}
    arrays: Dict[str, np.ndarray] = {}
    for key, value in stats.items():
        arr = _as_numpy(value)
        if arr is None or arr.size == 0:
            continue
        if arr.size == 1:
            scalars[key] = float(arr.reshape(()))
        else:
            arrays[key] = arr.astype(np.float64).reshape(-1)
    return scalars, arrays


def summarize_array(name: str, values: np.ndarray) -> Dict[str, float]:
    """``{name}/mean``, ``/std``, ``/min``, ``/max`` over the finite entries (NaN when none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {f"{name}/{k}": float("nan") for k in ("mean", "std", "min", "max")}
    return {
        f"{name}/mean": float(finite.mean()),
        f"{name}/std": float(finite.std()),
        f"{name}/min": float(finite.min()),
        f"{name}/max": float(finite.max()),
    }


def _json_float(x: float) -> Optional[float]:
    """Strict JSON has no NaN/inf: non-finite values are written as null."""
    return x if math.isfinite(x) else None


def _sample_rows(rows: Any) -> Tuple[List[str], List[list]]:
    """Normalise samples to ``(columns, rows)``: a list of dicts, or a dict of equal-length columns."""
    if isinstance(rows, Mapping):
        columns = list(rows)
        n = {len(v) for v in rows.values()}
        if len(n) > 1:
            raise ValueError(f"log_samples got columns of different lengths: { {k: len(v) for k, v in rows.items()} }.")
        data = [list(r) for r in zip(*(rows[c] for c in columns))]
    else:
        rows = list(rows)
        if not rows:
            return [], []
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("log_samples takes a list of dicts (e.g. {'query': ..., 'response': ..., 'reward': ...}) "
                            "or a dict of columns.")
        columns = list(rows[0])
        for r in rows[1:]:
            columns += [k for k in r if k not in columns]
        data = [[r.get(c) for c in columns] for r in rows]
    return columns, [[_plain(v) for v in r] for r in data]


def _plain(v: Any) -> Any:
    """A JSON-friendly cell: numbers as floats/ints, arrays as lists, everything else as str."""
    if isinstance(v, (str, bool, int)) or v is None:
        return v
    arr = _as_numpy(v)
    if arr is not None:
        if arr.size == 1:
            x = arr.reshape(()).item()
            return _json_float(x) if isinstance(x, float) else x
        return arr.tolist()
    return str(v)


def _markdown_cell(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def samples_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> str:
    lines = [f"## step {step}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------


class Sink:
    """Base class: ``log(scalars, arrays, step)``, ``log_samples(columns, rows, step)``, ``close()``."""

    wants_arrays = False  # True: gets raw arrays (histograms); False: gets summaries (or nothing)

    def log(self, scalars: Dict[str, float], arrays: Dict[str, np.ndarray], step: int) -> None:
        raise NotImplementedError

    def log_samples(self, columns: List[str], rows: List[list], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StdoutSink(Sink):
    """One line per ``log``: ``step 12 | objective/kl 0.031 | ...`` (through ``tqdm.write``,
    so an open progress bar is not broken). ``keys``: only these (None: all scalars)."""

    def __init__(self, keys: Optional[Sequence[str]] = None, stream: Any = None):
        self.keys = list(keys) if keys is not None else None
        self.stream = stream

    def log(self, scalars, arrays, step):
        items = scalars.items() if self.keys is None else [(k, scalars[k]) for k in self.keys if k in scalars]
        line = " | ".join([f"step {step}"] + [f"{k} {v:.4g}" for k, v in items])
        try:
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream or sys.stdout)
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            print(line, file=self.stream or sys.stdout, flush=True)


def drop_jsonl_records_after(path: str, step: int) -> int:
    """Resume hygiene: remove the lines of a ``{"step": N, ...}`` JSONL file whose step is past
    ``step`` (what a killed run logged after its last checkpoint, which the resumed run logs
    again). Returns how many lines were dropped; a missing file is fine. Atomic rewrite."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None  # a torn last line of a killed write: drop it too
            continue
        if record_step is None or int(record_step) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


class JsonlSink(Sink):
    """``{"step": N, name: value, ...}`` per line (strict JSON: non-finite values are null).
    Samples go to ``samples.jsonl`` and ``samples.md`` beside the metrics file."""

    def __init__(self, path: str, samples_dir: Optional[str] = None):
        self.path = path
        self.samples_dir = samples_dir or os.path.dirname(os.path.abspath(path))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, scalars, arrays, step):
        record = {"step": int(step), **{k: _json_float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def log_samples(self, columns, rows, step):
        os.makedirs(self.samples_dir, exist_ok=True)
        with open(os.path.join(self.samples_dir, "samples.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({"step": int(step), **dict(zip(columns, r))}, allow_nan=False) + "\n")
        with open(os.path.join(self.samples_dir, "samples.md"), "a") as f:
            f.write(samples_markdown(columns, rows, step))


def _require(name: str):
    module, command = _INSTALL[name]
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"Logging to {name} needs the {module!r} package, which is not installed: `{command}` "
            f"(or drop {name!r} from log_with / report_to / sinks)."
        ) from e


class TensorBoardSink(Sink):
    """tensorboardX ``SummaryWriter`` in ``logdir``: scalars, histograms of arrays, samples as a
    markdown text panel (tag ``game_log``, TRL's name)."""

    wants_arrays = True

    def __init__(self, logdir: str, config: Optional[Mapping[str, Any]] = None):
        tensorboardX = _require("tensorboard")
        self.logdir = logdir
        self.writer = tensorboardX.SummaryWriter(logdir=logdir)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(_jsonable(config), indent=2) + "\n```", 0)

    def log(self, scalars, arrays, step):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, global_step=step)
        for k, v in arrays.items():
            finite = v[np.isfinite(v)]
            if finite.size:
                self.writer.add_histogram(k, finite, global_step=step)
        self.writer.flush()

    def log_samples(self, columns, rows, step):
        self.writer.add_text("game_log", samples_markdown(columns, rows, step), global_step=step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink(Sink):
    """A W&B run (``wandb.init(project=..., config=..., dir=output_dir, **init_kwargs)``):
    scalars, ``wandb.Histogram`` of arrays, samples as a ``wandb.Table`` (key ``game_log``).
    Set ``WANDB_MODE=offline`` to log without a network."""

    wants_arrays = True

    def __init__(self, project: str = "rljax", config: Optional[Mapping[str, Any]] = None, directory: Optional[str] = None,
                 **init_kwargs: Any):
        self.wandb = _require("wandb")
        kwargs = dict(project=project, config=_jsonable(config or {}))
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            kwargs["dir"] = directory
        kwargs.update(init_kwargs)
        self.run = self.wandb.init(**kwargs)

    def log(self, scalars, arrays, step):
        payload: Dict[str, Any] = dict(scalars)
        for k, v in arrays.items():
            finite = v[np.isfinite(v)]
            if finite.size:
                payload[k] = self.wandb.Histogram(finite)
        self.run.log(payload, step=int(step))

    def log_samples(self, columns, rows, step):
        self.run.log({"game_log": self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=int(step))

    def close(self):
        self.run.finish()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------
# Names -> sinks
# --------------------------------------------------------------------------


def available(name: str) -> bool:
    """Whether the optional package behind sink ``name`` is importable (stdout/jsonl: always)."""
    name = _ALIASES.get(name, name)
    if name not in _INSTALL:
        return True
    return importlib.util.find_spec(_INSTALL[name][0]) is not None


def resolve_sink_names(names: Union[None, str, Iterable[str]]) -> List[str]:
    """Canonical sink names, in order, without duplicates.

    ``None``/``"none"`` -> []; ``"all"`` -> stdout, jsonl and the installed optional
    back-ends; a comma-separated string or a list of names otherwise. Unknown names raise
    a ValueError listing the valid ones.
    """
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    out: List[str] = []
    for raw in names:
        if raw is None:
            continue
        name = _ALIASES.get(str(raw).lower(), str(raw).lower())
        if name == "none":
            continue
        expanded = ["stdout", "jsonl"] + [n for n in _INSTALL if available(n)] if name == "all" else [name]
        for n in expanded:
            if n not in SINK_NAMES:
                raise ValueError(
                    f"Unknown logging sink {raw!r}; valid: {list(SINK_NAMES)} (aliases {sorted(_ALIASES)}, "
                    "'all', 'none')."
                )
            if n not in out:
                out.append(n)
    return out


class MetricLogger:
    """Fan one stats dict out to several sinks.

    Args:
      sinks: sink names (see the module docstring) or ``Sink`` objects; a string may list
        several (``"stdout,jsonl"``).
      output_dir: where file-based sinks write: ``metrics.jsonl`` (``jsonl_name``),
        ``samples.jsonl`` / ``samples.md``, TensorBoard events under ``output_dir/runs``,
        W&B files under ``output_dir``. Required for jsonl / tensorboard.
      config: run configuration recorded by TensorBoard (a text panel) and W&B (run config).
      project_name: W&B project (TRL: ``PPOConfig.tracker_project_name``).
      tracker_kwargs: extra ``wandb.init`` keywords (TRL: ``PPOConfig.tracker_kwargs``).
      sample_every: ``log_samples`` records only when ``step % sample_every == 0``.
      arrays: "summary" (default): JSONL/stdout get ``{name}/mean|std|min|max`` of each array;
        "drop": they get only scalars. TensorBoard / W&B always get histograms.
      stdout_keys: the scalars printed by the stdout sink (None: all).

    ``log(stats, step)`` and ``log_samples(rows, step)``; ``close()`` (or use ``with``)
    flushes and closes the back-ends.
    """

    def __init__(
        self,
        sinks: Union[None, str, Sequence[Union[str, Sink]]] = ("stdout", "jsonl"),
        output_dir: Optional[str] = None,
        *,
        config: Optional[Mapping[str, Any]] = None,
        project_name: str = "rljax",
        tracker_kwargs: Optional[Mapping[str, Any]] = None,
        sample_every: int = 1,
        arrays: str = "summary",
        stdout_keys: Optional[Sequence[str]] = None,
        jsonl_name: str = "metrics.jsonl",
    ):
        if arrays not in ("summary", "drop"):
            raise ValueError(f"arrays must be 'summary' or 'drop', got {arrays!r}.")
        if sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, got {sample_every}.")
        self.output_dir = output_dir
        self.sample_every = int(sample_every)
        self.arrays = arrays
        objects = [s for s in (sinks if isinstance(sinks, (list, tuple)) else []) if isinstance(s, Sink)]
        names = resolve_sink_names([s for s in sinks if isinstance(s, str)] if isinstance(sinks, (list, tuple)) else sinks)
        needs_dir = [n for n in names if n in ("jsonl", "tensorboard")]
        if needs_dir and output_dir is None:
            raise ValueError(f"Sinks {needs_dir} write files: pass output_dir=.")
        self.sinks: List[Sink] = []
        try:
            for name in names:
                if name == "stdout":
                    self.sinks.append(StdoutSink(stdout_keys))
                elif name == "jsonl":
                    self.sinks.append(JsonlSink(os.path.join(output_dir, jsonl_name), output_dir))
                elif name == "tensorboard":
                    self.sinks.append(TensorBoardSink(os.path.join(output_dir, "runs"), config))
                elif name == "wandb":
                    self.sinks.append(WandbSink(project_name, config, output_dir, **dict(tracker_kwargs or {})))
        except BaseException:
            self.close()
            raise
        self.sinks.extend(objects)
        self.names = names

    def log(self, stats: Mapping[str, Any], step: int) -> Dict[str, float]:
        """Log one step's stats; returns the scalars (plus array summaries) that were logged."""
        scalars, arrays = split_stats(stats)
        scalars.pop("step", None)
        summarized = dict(scalars)
        if self.arrays == "summary":
            for k, v in arrays.items():
                summarized.update(summarize_array(k, v))
        for sink in self.sinks:
            if sink.wants_arrays:
                sink.log(scalars, arrays, int(step))
            else:
                sink.log(summarized, {}, int(step))
        return summarized

    def should_log_samples(self, step: int) -> bool:
        return int(step) % self.sample_every == 0

    def log_samples(self, rows: Any, step: int, *, force: bool = False) -> bool:
        """Record a table of samples (list of dicts, e.g. ``{"query", "response", "reward"}``,
        or a dict of columns) when ``step % sample_every == 0`` (or ``force``). Returns
        whether it was recorded."""
        if not (force or self.should_log_samples(step)):
            return False
        columns, data = _sample_rows(rows)
        if not data:
            return False
        for sink in self.sinks:
            sink.log_samples(columns, data, int(step))
        return True

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - closing one back-end must not hide the others
                print(f"rljax.logging: closing {type(sink).__name__} failed: {e}", file=sys.stderr)
        self.sinks = []

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
