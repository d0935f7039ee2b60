"""Multi-process (multi-host) setup: ``jax.distributed`` from arguments or environment.

rljax runs one Python process per host (or per accelerator group). Each process calls
``initialize_distributed()`` once, before any other JAX call; afterwards
``jax.devices()`` lists every process's devices, ``rljax.sharding.make_mesh`` builds
one global mesh over them, and jitted steps run SPMD across processes (GSPMD; no pmap).
Each process feeds only its own rows of a batch (``make_global_batch``).

Configuration, first found wins:

==================  ===============================  ========================
argument            rljax environment variable       JAX equivalent
==================  ===============================  ========================
coordinator_address RLJAX_COORDINATOR_ADDRESS        JAX_COORDINATOR_ADDRESS
num_processes       RLJAX_NUM_PROCESSES              JAX_NUM_PROCESSES
process_id          RLJAX_PROCESS_ID                 JAX_PROCESS_ID
local_device_ids    RLJAX_LOCAL_DEVICE_IDS (1,2,..)  JAX_LOCAL_DEVICE_IDS
==================  ===============================  ========================

Nothing set, or ``num_processes == 1``: single-process, nothing to do. (On TPU pods
and SLURM/Open MPI clusters, pass ``auto_detect=True`` to let JAX discover the
settings itself.) CPU processes talk through gloo collectives
(``jax_cpu_collectives_implementation="gloo"``, the default in jax 0.10).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import jax

from rljax.sharding import make_global_batch  # noqa: F401  (re-exported: the multi-host batch helper)

_ENV = {
    "coordinator_address": ("RLJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("RLJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("RLJAX_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("RLJAX_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}

_INITIALIZED = False


def _from_env(name: str) -> Optional[str]:
    for var in _ENV[name]:
        value = os.environ.get(var)
        if value not in (None, ""):
            return value
    return None


def _as_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r} (from {' or '.join(_ENV[name])}).") from None


def distributed_settings(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Union[None, int, str, Sequence[int]] = None,
) -> dict:
    """The settings ``initialize_distributed`` would use (arguments, then environment)."""
    coordinator_address = coordinator_address or _from_env("coordinator_address")
    num_processes = _as_int("num_processes", num_processes if num_processes is not None else _from_env("num_processes"))
    process_id = _as_int("process_id", process_id if process_id is not None else _from_env("process_id"))
    if local_device_ids is None:
        local_device_ids = _from_env("local_device_ids")
    if isinstance(local_device_ids, str):
        local_device_ids = [int(x) for x in local_device_ids.split(",") if x.strip()]
    elif isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    return dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
    )


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Union[None, int, str, Sequence[int]] = None,
    *,
    auto_detect: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Join the multi-process JAX runtime; returns True when running multi-process.

    Call once per process before any other JAX computation. Arguments default to the
    environment (see the module docstring). A no-op returning False when single-process
    (nothing set, or ``num_processes`` 1) unless ``auto_detect``; calling it again is a no-op.
    Raises ValueError naming what is missing when the settings are incomplete.
    """
    global _INITIALIZED
    if _INITIALIZED or _jax_distributed_client() is not None:
        _INITIALIZED = True
        return jax.process_count() > 1
    s = distributed_settings(coordinator_address, num_processes, process_id, local_device_ids)
    if s["num_processes"] is None and s["coordinator_address"] is None and s["process_id"] is None:
        if not auto_detect:
            return False
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        _INITIALIZED = True
        return jax.process_count() > 1
    if s["num_processes"] == 1 and not s["coordinator_address"]:
        return False
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if s[k] is None]
    if missing:
        hints = ", ".join(f"{k} (or {_ENV[k][0]})" for k in missing)
        raise ValueError(f"Multi-process setup is incomplete: set {hints}.")
    if not 0 <= s["process_id"] < s["num_processes"]:
        raise ValueError(f"process_id must be in [0, {s['num_processes']}), got {s['process_id']}.")
    _use_gloo_on_cpu()
    kwargs = dict(
        coordinator_address=s["coordinator_address"],
        num_processes=s["num_processes"],
        process_id=s["process_id"],
        initialization_timeout=initialization_timeout,
    )
    if s["local_device_ids"] is not None:
        kwargs["local_device_ids"] = s["local_device_ids"]
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    return jax.process_count() > 1


def _jax_distributed_client():
    try:
        from jax._src import distributed as _d

        return _d.global_state.client
    except Exception:  # noqa: BLE001  (private API moved: assume not initialised)
        return None


def _use_gloo_on_cpu() -> None:
    """CPU processes need a cross-process collectives backend; gloo ships with jaxlib."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms and "cpu" not in platforms.split(","):
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001  (older/newer jax without the flag: its default applies)
        pass


def shutdown_distributed() -> None:
    """Leave the multi-process runtime (tests and clean exits); no-op if not initialised."""
    global _INITIALIZED
    if _jax_distributed_client() is not None:
        jax.distributed.shutdown()
    _INITIALIZED = False


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on the process that writes logs and HF exports (process 0)."""
    return jax.process_index() == 0


def local_batch_slice(global_batch_size: int) -> slice:
    """The rows of a global batch this process feeds (``make_global_batch`` layout).

    Raises ValueError unless ``global_batch_size`` divides evenly over the processes.
    """
    n, p = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(f"Global batch size {global_batch_size} does not split evenly over {n} processes.")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)
