"""Save and resume whole training states with orbax, safely.

``Checkpointer`` wraps ``orbax.checkpoint.CheckpointManager``:

- ``save(step, state, extra)`` writes the state pytree (params, optax state, step,
  PRNG key, KL-controller value, running moments: every array leaf of a
  ``TrainState`` / ``PPOTrainState``) and a JSON ``extra`` dict (data position,
  config, numpy/JAX arrays such as PRNG keys, stored bit-exactly). Saves are
  asynchronous where orbax supports it: ``save`` returns once the arrays are copied
  off the device, so the next (donating) step may run while files are written.
- ``restore(step=None, target_state, mesh=...)`` reads into a TEMPLATE state (a
  real or ``jax.eval_shape`` state: static fields such as ``tx`` and the KL
  controller's settings come from the template), placed with the template's
  shardings, with explicit ``shardings``, or with the partition rules on ``mesh``,
  which may differ from the mesh the checkpoint was written from.
- Every finished checkpoint gets a commit marker, ``rljax_commit.json``, listing its
  files with sizes (and CRC32s). A step without the marker (half-written: the job died
  mid-save), with missing/truncated/corrupt files, or that fails to load is skipped
  with a warning naming it, and the previous step is used. When the Checkpointer may
  write, a skipped step directory is renamed ``<step>.rljax-corrupt-<time>`` (never
  deleted) so training can save that step number again.
- A fresh run refuses a non-empty directory unless ``overwrite=True`` (old
  checkpoints are removed, with a warning) or ``resume=True``; saving a step that
  already exists raises. Nothing is overwritten silently.

Determinism (Levanter-style): restoring step k and continuing gives bitwise the
same params and metrics as never stopping, as long as the data order is a function
of the saved data position (tested in ``tests/test_checkpoint.py``).
"""
from __future__ import annotations

import atexit
import base64
import datetime
import errno
import json
import os
import shutil
import sys
import threading
import time
import warnings
import weakref
import zlib
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, SingleDeviceSharding

COMMIT_FILE = "rljax_commit.json"
_ITEMS = ("state", "extra", "meta")
_TMP_MARK = ".orbax-checkpoint-tmp"
_CORRUPT_MARK = ".rljax-corrupt"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (half-written or corrupt) or a directory was cleared."""


# --------------------------------------------------------------------------
# extra: JSON with exact arrays
# --------------------------------------------------------------------------


def _encode(obj: Any) -> Any:
    """JSON-able copy of ``obj``; numpy/JAX arrays become tagged base64 (bit-exact)."""
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"extra dict keys must be strings, got {bad[:3]}.")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, jax.Array) and jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
        obj = jax.random.key_data(obj)
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()  # numpy scalars (e.g. logged metrics) stay plain JSON numbers (exact value)
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(jax.device_get(obj))
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        return {"__ndarray__": base64.b64encode(arr.tobytes()).decode("ascii"), "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"extra values must be JSON types, numpy or JAX arrays; got {type(obj).__name__}. "
        "Convert it (e.g. dataclasses.asdict(config)) before saving."
    )


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            raw = base64.b64decode(obj["__ndarray__"])
            dtype = jnp.dtype(obj["dtype"])  # knows bfloat16 & co. (ml_dtypes)
            return np.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).copy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


# --------------------------------------------------------------------------
# commit markers
# --------------------------------------------------------------------------


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _list_files(step_dir: str) -> List[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel == COMMIT_FILE or rel == "_CHECKPOINT_METADATA":  # the latter is rewritten by orbax later
                continue
            out.append(rel)
    return sorted(out)


def write_commit_marker(step_dir: str, step: int, checksums: bool = True) -> None:
    """Record ``step_dir``'s files (size, CRC32) in ``rljax_commit.json`` (atomic write)."""
    files = {}
    for rel in _list_files(step_dir):
        path = os.path.join(step_dir, rel)
        entry = {"size": os.path.getsize(path)}
        if checksums:
            entry["crc32"] = _crc32(path)
        files[rel] = entry
    marker = {"step": int(step), "files": files, "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    tmp = os.path.join(step_dir, COMMIT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, COMMIT_FILE))


def verify_checkpoint(step_dir: str, checksums: bool = True) -> Optional[str]:
    """None if ``step_dir`` is a complete rljax checkpoint, else the reason it is not."""
    marker_path = os.path.join(step_dir, COMMIT_FILE)
    if not os.path.isdir(step_dir):
        return "the directory does not exist"
    if not os.path.exists(marker_path):
        return f"no commit marker ({COMMIT_FILE}): the save did not finish"
    try:
        with open(marker_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable commit marker ({type(e).__name__}: {e})"
    for rel, entry in files.items():
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
            return f"missing file {rel}"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, {entry['size']} were written (truncated or changed)"
        if checksums and "crc32" in entry and _crc32(path) != entry["crc32"]:
            return f"file {rel} fails its CRC32 check (corrupt)"
    return None


def scan_checkpoints(directory: str, checksums: bool = True) -> Tuple[List[int], List[Tuple[str, str]]]:
    """Read-only look at a Checkpointer directory (opens no CheckpointManager, moves nothing).

    Returns ``(committed, skipped)``: the steps whose commit marker and files check out,
    newest first, and ``(entry, reason)`` for every other step entry: half-written saves
    (``<step>.orbax-checkpoint-tmp-*``), steps without a commit marker, truncated or corrupt
    files. Entries already moved aside (``<step>.rljax-corrupt-*``) are not listed.
    """
    committed: List[int] = []
    skipped: List[Tuple[str, str]] = []
    if not os.path.isdir(directory):
        return committed, skipped
    steps = []
    for name in os.listdir(directory):
        if _CORRUPT_MARK in name:
            continue
        if _TMP_MARK in name and name.split(".", 1)[0].isdigit():
            skipped.append((name, "half-written: the save was interrupted before orbax finished writing it"))
        elif name.isdigit() and os.path.isdir(os.path.join(directory, name)):
            steps.append(int(name))
    for step in sorted(steps, reverse=True):
        reason = verify_checkpoint(os.path.join(directory, str(step)), checksums)
        if reason is None:
            committed.append(step)
        else:
            skipped.append((str(step), reason))
    skipped.sort(key=lambda e: int(e[0].split(".", 1)[0]), reverse=True)
    return committed, skipped


def checkpoint_problem(directory: str, checksums: bool = True, what: Optional[str] = None) -> Optional[str]:
    """None when the Checkpointer ``directory`` holds at least one committed, intact step;
    else why not (the newest skipped entry's reason), prefixed with ``what`` (default: the path)."""
    what = what if what is not None else directory
    if not os.path.isdir(directory):
        return f"no {what} (the save stopped before it was written)"
    committed, skipped = scan_checkpoints(directory, checksums)
    if committed:
        return None
    if skipped:
        entry, reason = skipped[0]
        return f"{os.path.join(what, entry)}: {reason}"
    return f"{what} holds no checkpoint"


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------


def _default_sharding():
    if jax.process_count() > 1:
        raise ValueError("Multi-process restore needs target shardings: pass mesh=... or shardings=..., or a sharded target_state.")
    return SingleDeviceSharding(jax.local_devices()[0])


def abstract_target(target_state: Any, mesh=None, shardings: Any = None, rules=None) -> Any:
    """``target_state`` as ``jax.ShapeDtypeStruct``s carrying the shardings to restore onto:
    explicit ``shardings`` > ``rules`` on ``mesh`` > the template arrays' own shardings >
    the first local device."""
    if shardings is None and mesh is not None:
        from rljax.sharding import state_shardings

        shardings = state_shardings(target_state, mesh, rules)

    def leaf(x, s=None):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        if s is None:
            s = getattr(x, "sharding", None)
            if not isinstance(s, (NamedSharding, SingleDeviceSharding, jax.sharding.Sharding)):
                s = _default_sharding()
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s)

    if shardings is None:
        return jax.tree_util.tree_map(leaf, target_state)
    return jax.tree_util.tree_map(leaf, target_state, shardings)


# --------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------

# Checkpointers with saves that may still be in flight. At interpreter exit they are
# finished and committed BEFORE concurrent.futures shuts its thread pools down (a
# plain ``atexit`` hook runs too late: orbax's background commit then fails with
# "cannot schedule new futures after interpreter shutdown" and the process hangs).
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _finish_open_checkpointers() -> None:
    for ck in list(_OPEN):
        try:
            ck.close()
        except Exception as e:  # never hang or mask the real exit status; say what happened
            print(f"rljax.checkpoint: could not finish the pending save in {ck.directory}: {e!r}", file=sys.stderr)


def _register_exit_hook() -> None:
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED:
        return
    # threading's exit hooks run in reverse registration order before the thread pools
    # of concurrent.futures stop accepting work (orbax imported it, so ours runs first).
    register = getattr(threading, "_register_atexit", None)
    try:
        (register or atexit.register)(_finish_open_checkpointers)
    except RuntimeError:  # already shutting down
        return
    _EXIT_HOOK_REGISTERED = True


class Checkpointer:
    """Periodic, verified, resumable checkpoints of a training state in ``directory``.

    Args:
      directory: checkpoint root (one sub-directory per step). Use a dedicated directory.
      save_interval_steps: ``save`` writes only at multiples of this (``force=True`` overrides).
      max_to_keep: keep the newest K checkpoints (None: all).
      async_save: write files in a background thread (orbax AsyncCheckpointer).
      overwrite: starting fresh in a non-empty directory removes its checkpoints (warned).
      resume: continue in an existing directory (``restore`` picks up the newest good step).
      checksums: record and verify CRC32s of every file (reads each file once more on
        restore; turn off for very large checkpoints, sizes are still checked).

    Use it as a context manager (``with Checkpointer(d) as ck: ...``) or call ``close()``;
    a checkpointer left open is closed at interpreter exit, so a started save is
    committed rather than lost.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int = 1,
        max_to_keep: Optional[int] = None,
        async_save: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        checksums: bool = True,
    ):
        if overwrite and resume:
            raise ValueError("Pass overwrite=True (start fresh, deleting old checkpoints) or resume=True, not both.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.checksums = checksums
        self.save_interval_steps = int(save_interval_steps)
        self.async_save = async_save
        self._lock = threading.Lock()
        self._pending: List[int] = []
        self._primary = jax.process_index() == 0
        self._prepare_directory(overwrite, resume)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=False,  # we report half-written saves ourselves
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._commit_pending) if async_save else None,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._closed = False
        _register_exit_hook()
        _OPEN.add(self)
        self._warn_half_written()

    # -- directory hygiene ---------------------------------------------------------------
    def _entries(self) -> List[str]:
        return sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []

    def _prepare_directory(self, overwrite: bool, resume: bool) -> None:
        entries = self._entries()
        if not entries or resume:
            return
        if not overwrite:
            raise FileExistsError(
                f"Checkpoint directory {self.directory} is not empty ({entries[:5]}{' ...' if len(entries) > 5 else ''}). "
                "Pass resume=True to continue from its checkpoints, overwrite=True to delete them and start fresh, "
                "or choose another directory."
            )
        ours = [e for e in entries if self._is_step_entry(e)]
        others = [e for e in entries if e not in ours]
        if others:
            raise FileExistsError(
                f"overwrite=True would only remove checkpoints, but {self.directory} also holds {others[:5]}; "
                "use a dedicated checkpoint directory."
            )
        warnings.warn(f"overwrite=True: removing {len(ours)} existing checkpoint entries from {self.directory}: {ours}.",
                      CheckpointWarning, stacklevel=3)
        if self._primary:
            for e in ours:
                shutil.rmtree(os.path.join(self.directory, e))
        _barrier("rljax_checkpoint_overwrite")

    @staticmethod
    def _is_step_entry(name: str) -> bool:
        head = name.split(".", 1)[0]
        return head.isdigit() or name.startswith("checkpoint_metadata")

    def _warn_half_written(self) -> None:
        tmp = [e for e in self._entries() if _TMP_MARK in e]
        if tmp:
            warnings.warn(
                f"Half-written checkpoint(s) in {self.directory} will be ignored: {tmp} (a save was interrupted). "
                "They are left in place; delete them when no job is writing there.",
                CheckpointWarning, stacklevel=3,
            )

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def _quarantine(self, step: int, reason: str) -> None:
        if not self._primary:
            return
        src = self._step_dir(step)
        dst = f"{src}{_CORRUPT_MARK}-{int(time.time())}"
        try:
            os.replace(src, dst)
            warnings.warn(f"Moved unusable checkpoint {src} to {dst} ({reason}).", CheckpointWarning, stacklevel=4)
        except OSError:
            pass

    # -- commit markers ------------------------------------------------------------------
    def _commit_pending(self) -> None:
        """Write the commit marker of every save whose files are finalized (thread-safe)."""
        with self._lock:
            still = []
            for step in self._pending:
                step_dir = self._step_dir(step)
                if os.path.isdir(step_dir):
                    if self._primary:
                        write_commit_marker(step_dir, step, self.checksums)
                else:
                    still.append(step)
            self._pending = still

    def wait_until_finished(self) -> None:
        """Block until every started save is written and committed. A background save that
        failed raises here (an ``OSError`` naming the step, e.g. a full disk) and gets no
        commit marker; earlier checkpoints are untouched."""
        try:
            self._mgr.wait_until_finished()
        except BaseException as e:
            with self._lock:
                failed, self._pending = list(self._pending), []
            if isinstance(e, OSError) and failed:
                raise _save_failed(self.directory, failed[-1], e) from e
            raise
        self._commit_pending()
        _barrier("rljax_checkpoint_committed")

    def close(self) -> None:
        """Finish and commit pending saves, then release orbax's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- save ----------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when ``step`` is a multiple of ``save_interval_steps``."""
        return int(step) % self.save_interval_steps == 0

    def save(self, step: int, state: Any, extra: Optional[Dict[str, Any]] = None, *, force: bool = False) -> bool:
        """Checkpoint ``state`` (any pytree of arrays) and ``extra`` at ``step``.

        Returns False (nothing written) when ``step`` is not a multiple of
        ``save_interval_steps`` and not ``force``. ``extra``: a dict of JSON values and
        numpy/JAX arrays (data position, config, PRNG keys, ...). Raises
        FileExistsError if ``step`` is already saved and ValueError if it is not after
        the newest checkpoint.
        """
        step = int(step)
        latest = self._mgr.latest_step()
        if latest is not None and step <= latest:
            if step in self._mgr.all_steps():
                raise FileExistsError(
                    f"Checkpoint step {step} already exists in {self.directory}; refusing to overwrite it. "
                    "Restore it (resume=True) or save under a new step."
                )
            raise ValueError(f"Cannot save step {step}: it is not after the newest checkpoint ({latest}).")
        if not force and not self.should_save(step):
            return False
        encoded = _encode(dict(extra or {}))
        meta = {
            "step": step,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "state_type": type(state).__name__,
            "num_leaves": len(jax.tree_util.tree_leaves(state)),
        }
        self._mgr.wait_until_finished()  # orbax would wait anyway; commit the previous save first
        self._commit_pending()
        with self._lock:
            self._pending.append(step)
        try:
            saved = self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(encoded), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            if not self.async_save:
                self._mgr.wait_until_finished()
        except BaseException as e:
            with self._lock:  # a failed save must never get a commit marker
                self._pending = [s for s in self._pending if s != step]
            if isinstance(e, ocp.checkpoint_manager.StepAlreadyExistsError):
                raise FileExistsError(f"Checkpoint step {step} already exists in {self.directory}: {e}") from e
            if isinstance(e, OSError):
                raise _save_failed(self.directory, step, e) from e
            raise
        if not self.async_save:
            self._commit_pending()
        return bool(saved)

    # -- restore -------------------------------------------------------------------------
    def all_steps(self) -> List[int]:
        """Every step orbax lists (including ones that may turn out corrupt), ascending."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest step with a valid commit marker and intact file sizes (None if none).
        Skipped steps are reported with a warning."""
        for step in reversed(self.all_steps()):
            if step in self._pending:
                self.wait_until_finished()
            reason = verify_checkpoint(self._step_dir(step), checksums=False)
            if reason is None:
                return step
            warnings.warn(f"Skipping checkpoint {self._step_dir(step)}: {reason}.", CheckpointWarning, stacklevel=2)
        return None

    def restore(
        self,
        step: Optional[int] = None,
        target_state: Any = None,
        *,
        mesh=None,
        shardings: Any = None,
        rules=None,
    ) -> Tuple[Any, Dict[str, Any]]:
        """Load a checkpoint into the structure of ``target_state``; returns ``(state, extra)``.

        ``target_state``: a state of the same structure (real arrays or ``jax.eval_shape``
        output); its static fields (``tx``, KL-controller settings) are kept. Arrays go to
        ``shardings`` (a pytree like the state) or, with ``mesh``, to the partition rules'
        shardings on that mesh (``rljax.sharding.state_shardings``; any mesh, not only the
        one saved from), else to the template arrays' shardings. ``step=None``: the newest
        usable checkpoint; corrupt or half-written ones are skipped with a warning naming
        them. An explicit ``step`` that is unusable raises. ``extra`` holds what ``save``
        got, plus ``"checkpoint_step"``.
        """
        if target_state is None:
            raise ValueError(
                "restore needs target_state: a state of the saved structure (e.g. TrainState.create(...) or "
                "jax.eval_shape of it); its static fields (tx, KL settings) are not stored in checkpoints."
            )
        self.wait_until_finished()
        target = abstract_target(target_state, mesh, shardings, rules)
        candidates = [int(step)] if step is not None else list(reversed(self.all_steps()))
        if not candidates:
            half = [e for e in self._entries() if _TMP_MARK in e]
            raise FileNotFoundError(
                f"No committed checkpoint in {self.directory}"
                + (f" (only half-written saves: {half})" if half else "")
                + "; start a fresh run (without resume) or point to the directory that holds the checkpoints."
            )
        for s in candidates:
            step_dir = self._step_dir(s)
            reason = verify_checkpoint(step_dir, self.checksums)
            if reason is None:
                try:
                    restored = self._mgr.restore(
                        s,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
                        ),
                    )
                except Exception as e:  # noqa: BLE001
                    if step is not None or _looks_like_mismatch(e):
                        raise ValueError(
                            f"Could not restore {step_dir} into the given target_state ({type(e).__name__}: {e}). "
                            "Check that the template has the saved structure (same model config and optimizer)."
                        ) from e
                    # Intact files (per the commit marker) that still fail to load: skip, keep on disk.
                    warnings.warn(f"Skipping checkpoint {step_dir}: failed to load ({type(e).__name__}: {str(e)[:300]}). "
                                  "Falling back to an earlier step.", CheckpointWarning, stacklevel=2)
                    continue
                extra = _decode(restored.extra or {})
                extra["checkpoint_step"] = s
                return restored.state, extra
            if step is not None:
                raise ValueError(f"Checkpoint {step_dir} is unusable: {reason}.")
            warnings.warn(f"Skipping checkpoint {step_dir}: {reason}. Falling back to an earlier step.",
                          CheckpointWarning, stacklevel=2)
            self._quarantine(s, reason)
            _barrier(f"rljax_checkpoint_quarantine_{s}")
            self._mgr.reload()
        raise FileNotFoundError(f"No usable checkpoint in {self.directory} (all were skipped; see the warnings).")

    def read_extra(self, step: Optional[int] = None) -> Dict[str, Any]:
        """Only the ``extra`` dict of a checkpoint (newest usable one by default)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"No checkpoints in {self.directory}.")
        restored = self._mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        extra = _decode(restored.extra or {})
        extra["checkpoint_step"] = step
        return extra


def _save_failed(directory: str, step: int, e: OSError) -> OSError:
    """The OSError a failed save raises: what failed, that older checkpoints are intact, what to do."""
    why = e.strerror or str(e)
    hint = "free disk space" if e.errno == errno.ENOSPC else "fix the file system error"
    return OSError(
        e.errno,
        f"Checkpoint step {step} could not be written to {directory} ({why}). It was not committed and will be "
        f"skipped on resume; earlier checkpoints are intact. {hint.capitalize()}, then resume from the newest "
        "committed checkpoint.",
    )


def _looks_like_mismatch(e: Exception) -> bool:
    """A restore error caused by the caller's template (not by damaged files)."""
    text = str(e).lower()
    return any(w in text for w in ("structure", "mismatch", "shape", "tree"))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
