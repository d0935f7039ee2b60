"""Fault injection: training subprocesses SIGKILLed mid-step, mid-save and just after a
checkpoint commit, then resumed, end with params bitwise equal to an uninterrupted run;
half-written and corrupt checkpoints are skipped with a warning naming them; a full disk
leaves the previous checkpoint intact and says so.

The runs live in ``tests/_fault_worker.py`` (SFT through ``SFTTrainer``, PPO through the
``rljax ppo`` command). Each kill is deterministic: the worker monkeypatches the chosen point
(``KILL_AT=step:3``, ``orbax:4``, ``save:4``, ``after_commit:4``) to ``SIGKILL`` itself. The SFT
and PPO chains run side by side (two threads of subprocesses) and share a persistent jit cache,
so each process after the first compiles little.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocess runs (still part of CI)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_fault_worker.py")
KILLED = -signal.SIGKILL

SFT_STAGES = ["step:3", "orbax:4", "save:4", "after_commit:4", ""]
PPO_STAGES = ["step:2", "save:3", "after_commit:3", ""]


def _listing(root: str) -> list:
    """Step entries of a checkpoint directory: ``checkpoint-<step>`` dirs with their
    ``train_state/`` entries (SFT), or the step entries of ``checkpoints/`` (PPO)."""
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name[0].isdigit():
            out.append(name)
        elif name.startswith("checkpoint-"):
            out.append(name)
            state_dir = os.path.join(root, name, "train_state")
            if os.path.isdir(state_dir):
                out += [f"{name}/train_state"] + [f"{name}/train_state/{e}" for e in sorted(os.listdir(state_dir))]
    return out


def _run_worker(args, env, kill_at: str, timeout: int = 300) -> dict:
    env = dict(env, KILL_AT=kill_at)
    proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, env=env, timeout=timeout)
    return {"kill_at": kill_at, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _chain(kind: str, extra_args: list, out: str, ref: str, stages: list, env: dict, results: dict, hook=None) -> None:
    try:
        results["ref"] = _run_worker([kind, ref, *extra_args], env, "")
        results["stages"] = []
        for i, kill_at in enumerate(stages):
            resume = ["--resume"] if i > 0 else []
            record = _run_worker([kind, out, *extra_args, *resume], env, kill_at)
            record["listing"] = _listing(os.path.join(out, "checkpoints") if kind == "ppo" else out)
            results["stages"].append(record)
            if hook is not None:
                hook(kill_at, out)
            if kill_at and record["returncode"] != KILLED:
                break  # the fault did not fire: stop here, the tests report it
    except BaseException as e:  # noqa: BLE001  (reported by the tests)
        results["error"] = e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both chains, run side by side: an uninterrupted reference and the killed-and-resumed run."""
    root = tmp_path_factory.mktemp("faults")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(root / "jit_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    assets = str(root / "ppo_assets")
    prep = _run_worker(["ppo_assets", assets], env, "")
    assert prep["returncode"] == 0, prep["stderr"][-3000:]

    def snapshot(kill_at, out):  # keep a copy of the run right after checkpoint-4 was committed
        if kill_at == "after_commit:4":
            shutil.copytree(out, str(root / "sft_after_commit"))

    sft, ppo = {}, {}
    threads = [
        threading.Thread(target=_chain, args=("sft", [], str(root / "sft"), str(root / "sft_ref"), SFT_STAGES, env, sft,
                                              snapshot)),
        threading.Thread(target=_chain, args=("ppo", [assets], str(root / "ppo"), str(root / "ppo_ref"), PPO_STAGES, env,
                                              ppo)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, res in (("sft", sft), ("ppo", ppo)):
        if "error" in res:
            raise res["error"]
        assert res["ref"]["returncode"] == 0, f"{name} reference run failed:\n{res['ref']['stderr'][-3000:]}"
    return {"root": root, "sft": sft, "ppo": ppo}


def _stage(res: dict, kill_at: str) -> dict:
    for record in res["stages"]:
        if record["kill_at"] == kill_at:
            return record
    raise AssertionError(f"stage {kill_at!r} did not run (an earlier stage failed): {res['stages'][-1]['stderr'][-3000:]}")


def _killed(record: dict) -> None:
    assert record["returncode"] == KILLED, (record["kill_at"], record["returncode"], record["stderr"][-3000:])
    assert f"SIGKILL at {record['kill_at']}" in record["stdout"]


def _bitwise_equal_npz(a: str, b: str) -> None:
    x, y = np.load(a), np.load(b)
    assert sorted(x.files) == sorted(y.files)
    for k in x.files:
        assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


# --------------------------------------------------------------------------
# SFT (SFTTrainer.train, checkpoint-<step>/ every 2 of 8 updates)
# --------------------------------------------------------------------------


def test_sft_killed_mid_step_keeps_the_last_checkpoint(runs):
    rec = _stage(runs["sft"], "step:3")
    _killed(rec)
    assert rec["listing"] == ["checkpoint-2", "checkpoint-2/train_state", "checkpoint-2/train_state/2"]


def test_sft_killed_inside_the_orbax_write_is_skipped_with_a_warning(runs):
    _killed(_stage(runs["sft"], "orbax:4"))
    assert "checkpoint-4/train_state/4.orbax-checkpoint-tmp" in _stage(runs["sft"], "orbax:4")["listing"]
    nxt = _stage(runs["sft"], "save:4")  # the next run: resumes from checkpoint-2, naming checkpoint-4
    assert "skipping" in nxt["stderr"] and "checkpoint-4 (train_state/4.orbax-checkpoint-tmp: half-written" in nxt["stderr"]
    assert f"resuming from {os.path.join(str(runs['root']), 'sft', 'checkpoint-2')}" in nxt["stderr"]


def test_sft_killed_before_the_commit_marker_is_skipped_with_a_warning(runs):
    rec = _stage(runs["sft"], "save:4")
    _killed(rec)
    assert "checkpoint-4/train_state/4" in rec["listing"]  # orbax finished the files; no rljax commit marker
    nxt = _stage(runs["sft"], "after_commit:4")
    assert "checkpoint-4 (train_state/4: no commit marker" in nxt["stderr"]
    assert f"resuming from {os.path.join(str(runs['root']), 'sft', 'checkpoint-2')}" in nxt["stderr"]


def test_sft_killed_just_after_commit_resumes_from_that_checkpoint(runs):
    from rljax.trainers.base import find_resume_checkpoint

    _killed(_stage(runs["sft"], "after_commit:4"))
    final = _stage(runs["sft"], "")
    assert final["returncode"] == 0, final["stderr"][-3000:]
    assert "skipping" not in final["stderr"]
    snap = str(runs["root"] / "sft_after_commit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip
        assert find_resume_checkpoint(snap) == os.path.join(snap, "checkpoint-4")


def test_sft_resumed_through_every_kill_is_bitwise_equal_to_an_uninterrupted_run(runs):
    assert _stage(runs["sft"], "")["returncode"] == 0
    root = str(runs["root"])
    _bitwise_equal_npz(os.path.join(root, "sft", "final_params.npz"), os.path.join(root, "sft_ref", "final_params.npz"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_sft_corrupt_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, damage):
    from rljax.checkpoint import CheckpointWarning
    from rljax.trainers.base import find_resume_checkpoint

    out = str(tmp_path / "run")
    shutil.copytree(str(runs["root"] / "sft_after_commit"), out)
    state_dir = os.path.join(out, "checkpoint-4", "train_state", "4", "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        if damage == "truncate":
            f.truncate(os.path.getsize(big) // 2)
        else:
            f.seek(os.path.getsize(big) // 2)
            f.write(b"\xff" * 8)
    why = "truncated" if damage == "truncate" else "CRC32"
    with pytest.warns(CheckpointWarning, match=rf"skipping .*checkpoint-4 \(train_state/4: file .*{why}.*resuming from .*checkpoint-2"):
        assert find_resume_checkpoint(out) == os.path.join(out, "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-4 cannot be resumed from: .*newest usable checkpoint there is .*checkpoint-2"):
        find_resume_checkpoint(os.path.join(out, "checkpoint-4"))  # an explicit checkpoint is not swapped silently


# --------------------------------------------------------------------------
# PPO (`rljax ppo`, a checkpoint every iteration of 4)
# --------------------------------------------------------------------------


def test_ppo_killed_mid_iteration_resumes_from_the_last_checkpoint(runs):
    rec = _stage(runs["ppo"], "step:2")
    _killed(rec)
    assert rec["listing"] == ["1"]
    assert "resumed from" in _stage(runs["ppo"], "save:3")["stdout"] and "at iteration 1" in _stage(runs["ppo"], "save:3")["stdout"]


def test_ppo_killed_before_the_commit_marker_is_skipped_with_a_warning(runs):
    rec = _stage(runs["ppo"], "save:3")
    _killed(rec)
    assert rec["listing"] == ["1", "2", "3"]
    nxt = _stage(runs["ppo"], "after_commit:3")
    assert f"{os.sep}3: no commit marker" in nxt["stderr"] and "Falling back to an earlier step" in nxt["stderr"]
    assert "at iteration 2" in nxt["stdout"]


def test_ppo_killed_after_commit_and_resumed_is_bitwise_equal_to_an_uninterrupted_run(runs):
    rec = _stage(runs["ppo"], "after_commit:3")
    _killed(rec)
    assert [e for e in rec["listing"] if ".rljax-corrupt" not in e] == ["1", "2", "3"]
    final = _stage(runs["ppo"], "")
    assert final["returncode"] == 0, final["stderr"][-3000:]
    assert "at iteration 3" in final["stdout"] and "Skipping" not in final["stderr"]
    root = str(runs["root"])
    _bitwise_equal_npz(os.path.join(root, "ppo", "final_params.npz"), os.path.join(root, "ppo_ref", "final_params.npz"))


# --------------------------------------------------------------------------
# In-process: nothing committed, HF model without a train state, a full disk
# --------------------------------------------------------------------------


def _small_state():
    import jax
    import jax.numpy as jnp
    import optax

    from rljax.train_state import TrainState

    params = {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones((8,), jnp.float32)}
    return TrainState.create(params, optax.adam(1e-3), jax.random.PRNGKey(0))


def test_resume_skips_a_checkpoint_with_an_hf_model_but_no_train_state(tmp_path):
    from rljax.checkpoint import CheckpointWarning
    from rljax.trainers.base import find_resume_checkpoint, save_train_state

    save_train_state(str(tmp_path / "checkpoint-2"), _small_state(), 2, 4)
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")  # the HF model was written, then the job died
    with pytest.warns(CheckpointWarning, match=r"skipping .*checkpoint-4 \(no train_state/"):
        assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-4 cannot be resumed from: no train_state/"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-4"))


def test_resume_with_nothing_committed_is_a_clear_file_not_found(tmp_path):
    from rljax.checkpoint import Checkpointer
    from rljax.trainers.base import find_resume_checkpoint

    os.makedirs(tmp_path / "checkpoint-2" / "train_state" / "2.orbax-checkpoint-tmp")
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no committed checkpoint in .*checkpoint-4: no train_state/.*"
                                                r"checkpoint-2: train_state/2.orbax-checkpoint-tmp: half-written.*fresh run"):
        find_resume_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step>/train_state in"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-2" / "train_state"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        find_resume_checkpoint(str(tmp_path / "missing"))
    # The Checkpointer (the `rljax ppo` path) says the same about its directory.
    d = tmp_path / "ppo_checkpoints"
    os.makedirs(d / "3.orbax-checkpoint-tmp")
    with pytest.warns(UserWarning, match="Half-written"):
        ck = Checkpointer(str(d), resume=True)
    with pytest.raises(FileNotFoundError, match=r"No committed checkpoint in .*only half-written saves: \['3.orbax"):
        ck.restore(target_state=_small_state())
    ck.close()


def _fill_disk_at(monkeypatch, step: int):
    """Make orbax's final write of ``step`` fail with ENOSPC (after its files went to a tmp dir)."""
    from orbax.checkpoint._src.path import async_path

    original = async_path.rename

    async def rename(src, dst):
        if os.path.basename(str(dst)) == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return await original(src, dst)

    monkeypatch.setattr(async_path, "rename", rename)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_leaves_the_previous_checkpoint_intact_and_says_so(tmp_path, monkeypatch, async_save):
    import jax

    from rljax.checkpoint import COMMIT_FILE, Checkpointer

    d = str(tmp_path / "ck")
    state = _small_state()
    ck = Checkpointer(d, async_save=async_save)
    ck.save(1, state, {"data_position": 1})
    ck.wait_until_finished()
    _fill_disk_at(monkeypatch, 2)
    with pytest.raises(OSError, match=r"step 2 could not be written .*No space left on device.*not committed.*"
                                      r"earlier checkpoints are intact. Free disk space") as e:
        ck.save(2, state, {"data_position": 2})
        ck.wait_until_finished()
    assert e.value.errno == errno.ENOSPC
    ck.close()
    assert not os.path.exists(os.path.join(d, "2", COMMIT_FILE))
    monkeypatch.undo()
    with Checkpointer(d, resume=True) as ck2:
        assert ck2.latest_step() == 1
        restored, extra = ck2.restore(target_state=_small_state())
    assert extra["data_position"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)))


def test_trainer_save_on_a_full_disk_keeps_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    from rljax.trainers.base import find_resume_checkpoint, restore_train_state, save_train_state

    state = _small_state()
    save_train_state(str(tmp_path / "checkpoint-2"), state, 2, 4)
    _fill_disk_at(monkeypatch, 4)
    with pytest.raises(OSError, match=r"step 4 could not be written to .*checkpoint-4.*No space left on device"):
        save_train_state(str(tmp_path / "checkpoint-4"), state, 4, 8)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"skipping .*checkpoint-4"):
        resume = find_resume_checkpoint(str(tmp_path))
    assert resume == str(tmp_path / "checkpoint-2")
    _, extra = restore_train_state(resume, _small_state())
    assert (extra["step"], extra["data_position"]) == (2, 4)
