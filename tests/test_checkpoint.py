"""rljax.checkpoint: safe directories, bitwise resume, restore onto another mesh,
corrupt/half-written checkpoints skipped, HF export of trained models."""
from __future__ import annotations

import functools
import glob
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _mesh_fixtures as F
from rljax import sharding as S
from rljax.checkpoint import COMMIT_FILE, Checkpointer, CheckpointWarning, _decode, _encode, verify_checkpoint


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(F.to_numpy(a)), jax.tree_util.tree_leaves(F.to_numpy(b))
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def _small_state(seed=0):
    """A TrainState over a tiny params dict (no model compile needed)."""
    import optax

    from rljax.train_state import TrainState

    rng = np.random.default_rng(seed)
    params = {"transformer": {"wte": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
                              "h_0": {"attn": {"c_attn": {"kernel": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)}}}}}
    return TrainState.create(params, optax.adam(1e-3), jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------
# extra, directories, save rules
# --------------------------------------------------------------------------


def test_extra_round_trips_arrays_bit_exactly():
    import ml_dtypes

    extra = {
        "data_position": 123, "config": {"lr": 1.41e-5, "name": "x", "sizes": [1, 2]}, "none": None,
        "logged": [{"loss": np.float32(0.1), "step": np.int64(3)}],
        "rng": jax.random.PRNGKey(7), "typed_key": jax.random.key(3),
        "f32": np.array([np.nan, -0.0, 1e-45, np.inf], np.float32), "bf16": np.ones((2, 2), ml_dtypes.bfloat16),
    }
    out = _decode(_encode(extra))
    assert out["data_position"] == 123 and out["config"] == extra["config"] and out["none"] is None
    assert out["logged"] == [{"loss": float(np.float32(0.1)), "step": 3}]  # numpy scalars -> JSON numbers
    assert out["rng"].dtype == np.uint32 and np.array_equal(out["rng"], np.asarray(extra["rng"]))
    assert np.array_equal(out["typed_key"], np.asarray(jax.random.key_data(extra["typed_key"])))
    assert out["f32"].tobytes() == extra["f32"].tobytes() and out["bf16"].dtype == extra["bf16"].dtype
    with pytest.raises(TypeError, match="extra values must be JSON types"):
        _encode({"bad": object()})


def test_fresh_start_refuses_a_non_empty_directory(tmp_path):
    d = str(tmp_path / "ckpt")
    with Checkpointer(d, async_save=False) as ck:
        ck.save(1, _small_state())
    with pytest.raises(FileExistsError, match="resume=True .* overwrite=True"):
        Checkpointer(d)
    with pytest.raises(ValueError, match="not both"):
        Checkpointer(d, overwrite=True, resume=True)
    with Checkpointer(d, resume=True) as ck:
        assert ck.latest_step() == 1
    with pytest.warns(CheckpointWarning, match="removing 1 existing checkpoint"):
        ck = Checkpointer(d, overwrite=True)
    assert ck.latest_step() is None
    ck.close()
    other = tmp_path / "mixed"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="dedicated checkpoint directory"):
        Checkpointer(str(other), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_save_interval_and_no_silent_overwrite(tmp_path):
    state = _small_state()
    with Checkpointer(str(tmp_path / "c"), save_interval_steps=2, max_to_keep=2) as ck:
        assert ck.save(1, state) is False
        assert ck.save(2, state) is True
        with pytest.raises(FileExistsError, match="already exists"):
            ck.save(2, state)
        with pytest.raises(ValueError, match="not after the newest checkpoint"):
            ck.save(1, state, force=True)
        assert ck.save(3, state, force=True) is True
        ck.save(4, state)
        ck.wait_until_finished()
        assert ck.all_steps() == [3, 4]  # max_to_keep
        assert verify_checkpoint(os.path.join(ck.directory, "4")) is None


# --------------------------------------------------------------------------
# Corrupt and half-written checkpoints
# --------------------------------------------------------------------------


def _data_files(step_dir):
    return sorted((f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)),
                  key=os.path.getsize)


def test_corrupt_and_half_written_checkpoints_are_skipped_with_a_warning(tmp_path):
    d = str(tmp_path / "c")
    states = {s: _small_state(seed=s) for s in (1, 2, 3, 4)}
    with Checkpointer(d) as ck:
        for s, st in states.items():
            ck.save(s, st, extra={"data_position": s})
    # step 4: a file truncated; step 3: same size but flipped bytes; step 2: no commit marker.
    big = _data_files(os.path.join(d, "4"))[-1]
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    big3 = _data_files(os.path.join(d, "3"))[-1]
    with open(big3, "r+b") as f:
        f.seek(os.path.getsize(big3) // 2)
        f.write(b"\xff" * 8)
    os.remove(os.path.join(d, "2", COMMIT_FILE))
    os.makedirs(os.path.join(d, "5.orbax-checkpoint-tmp-1234", "state"))  # a save killed mid-write

    with pytest.warns(CheckpointWarning, match=r"Half-written checkpoint\(s\) .*5\.orbax-checkpoint-tmp-1234"):
        ck = Checkpointer(d, resume=True)
    with pytest.raises(ValueError, match=r"/4 is unusable: file .*truncated"):
        ck.restore(4, target_state=_small_state())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, extra = ck.restore(target_state=_small_state(seed=9))
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any(f"{os.sep}4: file" in m and "truncated" in m for m in messages), messages
    assert any(f"{os.sep}3: file" in m and "CRC32" in m for m in messages), messages
    assert any(f"{os.sep}2: no commit marker" in m for m in messages), messages
    assert extra["checkpoint_step"] == 1 and extra["data_position"] == 1
    assert _bitwise_equal(state, states[1])
    # Skipped steps were moved aside (not deleted), so training can save those steps again.
    assert sorted(e.split(".")[0] for e in os.listdir(d) if ".rljax-corrupt" in e) == ["2", "3", "4"]
    assert ck.latest_step() == 1
    ck.save(2, states[2])
    ck.close()


# --------------------------------------------------------------------------
# Bitwise resume
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sft_step():
    from rljax.sft import make_sft_loss
    from rljax.trainers.base import make_train_step

    module, params = F.tiny_gpt2(n_layer=1)
    return module, params, make_train_step(make_sft_loss(module), gradient_accumulation_steps=2, donate=True)


def _sft_batch_at(position: int) -> dict:
    return F.sft_batch(8, seed=1000 + position)


def test_sft_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    module, params, step = _sft_step()
    k, m = 2, 3
    fresh = lambda: F.sft_state(module, jax.tree_util.tree_map(jnp.copy, params))  # noqa: E731

    # Run A: k steps, save (async), keep going to k + m without stopping.
    state, metrics_a, pos = fresh(), [], 0
    with Checkpointer(str(tmp_path / "a")) as ck:
        for i in range(1, k + m + 1):
            state, metrics = step(state, _sft_batch_at(pos))  # donates the previous state
            pos += 1
            metrics_a.append(F.to_numpy(metrics))
            if i == k:
                ck.save(i, state, extra={"data_position": pos, "config": {"lr": 1e-3}})
    final_a = F.to_numpy(state)

    # Run B: a new process would start from a template; restore step k and continue.
    ck = Checkpointer(str(tmp_path / "a"), resume=True)
    template = jax.eval_shape(fresh)
    state, extra = ck.restore(target_state=template)
    ck.close()
    assert extra["checkpoint_step"] == k and int(state.step) == k
    pos, metrics_b = extra["data_position"], []
    for _ in range(m):
        state, metrics = step(state, _sft_batch_at(pos))
        pos += 1
        metrics_b.append(F.to_numpy(metrics))
    assert _bitwise_equal(state, final_a)
    assert _bitwise_equal(metrics_b, metrics_a[k:])
    assert not _bitwise_equal(final_a.params, params)  # it did train


@functools.lru_cache(maxsize=None)
def _ppo_iteration():
    """(module, config, fresh_state_fn, step) where step(state, i) = fixed-token rollout from the
    current params, scores depending on i, then ppo_step (jitted, donating the state)."""
    from rljax.ppo_train import make_forward_rollout, make_ppo_step

    config = F.ppo_config(init_kl_coef=0.2, adap_kl_ctrl=True, target=0.01, horizon=100)
    module, config, state, _, _ = F.ppo_setup(config=config)
    q, qm, r, rm = F.ppo_inputs(config.batch_size)
    forward = make_forward_rollout(module)
    ppo_step = make_ppo_step(module, config)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def iteration(state, i):
        rollout = forward(state.params, state.ref_params, q, qm, r, rm)
        scores = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), i), (config.batch_size,))
        return ppo_step(state, rollout, scores)

    init = F.to_numpy(state)
    fresh = lambda: jax.tree_util.tree_map(jnp.asarray, init)  # noqa: E731
    return module, config, fresh, iteration


@pytest.mark.slow
def test_ppo_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    module, config, fresh, iteration = _ppo_iteration()
    k, m = 1, 2
    state, stats_a = fresh(), []
    with Checkpointer(str(tmp_path / "ppo")) as ck:
        for i in range(k + m):
            state, stats = iteration(state, i)
            stats_a.append(F.to_numpy(stats))
            if i + 1 == k:
                ck.save(i + 1, state, extra={"iteration": i + 1})
    final_a = F.to_numpy(state)
    assert float(final_a.kl.value) != 0.2 and float(final_a.score_moments.count) > 1  # controller and moments moved

    ck = Checkpointer(str(tmp_path / "ppo"), resume=True)
    state, extra = ck.restore(target_state=jax.eval_shape(fresh))
    ck.close()
    assert state.kl.adaptive and state.kl.target == 0.01  # static fields from the template
    stats_b = []
    for i in range(extra["iteration"], k + m):
        state, stats = iteration(state, i)
        stats_b.append(F.to_numpy(stats))
    assert _bitwise_equal(state, final_a)
    assert _bitwise_equal(stats_b, stats_a[k:])


# --------------------------------------------------------------------------
# Restore onto another mesh
# --------------------------------------------------------------------------


def test_restore_onto_a_different_mesh(tmp_path):
    module, params = F.tiny_gpt2(n_layer=1)
    state = F.sft_state(module, params)
    saved_from = S.make_mesh(8, 1, 1)
    sharded = S.shard_params(state, saved_from)
    with Checkpointer(str(tmp_path / "m")) as ck:
        ck.save(1, sharded)
    expect = F.to_numpy(state)
    ck = Checkpointer(str(tmp_path / "m"), resume=True)
    for shape in ((2, 4, 1), (2, 2, 2)):
        mesh = S.make_mesh(*shape)
        restored, _ = ck.restore(target_state=jax.eval_shape(lambda: state), mesh=mesh)
        assert _bitwise_equal(restored, expect)
        _, f, m = shape
        kernel = restored.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]  # [32, 128]
        assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P("fsdp", "model")
        assert kernel.addressable_shards[0].data.shape == (32 // f, 128 // m)
        mu = restored.opt_state[1][0].mu["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
        assert mu.sharding.spec == P("fsdp", "model") and mu.addressable_shards[0].data.shape == (32 // f, 128 // m)
    # explicit shardings, and the template's own (single-device) placement
    sh = S.state_shardings(state, S.make_mesh(1, 8, 1))
    restored, _ = ck.restore(target_state=state, shardings=sh)
    assert restored.params["transformer"]["wte"]["embedding"].addressable_shards[0].data.shape == (F.VOCAB, 4)
    restored, _ = ck.restore(target_state=state)
    assert len(restored.params["transformer"]["wte"]["embedding"].sharding.device_set) == 1
    assert _bitwise_equal(restored, expect)
    ck.close()


# --------------------------------------------------------------------------
# HF export of trained models
# --------------------------------------------------------------------------


def test_trained_policy_loads_in_transformers_with_identical_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rljax.models import save_pretrained

    module, params, step = _sft_step()  # a few SFT steps
    state = F.sft_state(module, jax.tree_util.tree_map(jnp.copy, params))
    for i in range(3):
        state, _ = step(state, _sft_batch_at(i))
    save_pretrained(module, state.params, str(tmp_path / "policy"))
    ids = F.sft_batch(2, seed=5)["input_ids"]
    ours = np.asarray(module.apply({"params": state.params}, ids).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy")).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ppo_trained_value_head_model_loads_in_transformers(tmp_path):
    """LM logits in transformers; values = TRL's v_head (Linear on the last hidden state)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from rljax.models.heads import save_value_head_model

    ids = F.sft_batch(2, seed=5)["input_ids"]
    vmodule, config, fresh, iteration = _ppo_iteration()
    vstate = fresh()
    for i in range(2):
        vstate, _ = iteration(vstate, i)
    save_value_head_model(vmodule, vstate.params, str(tmp_path / "value"))
    out = vmodule.apply({"params": vstate.params}, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "value")).eval()
    sd = load_file(str(tmp_path / "value" / "model.safetensors"))
    with torch.no_grad():
        hf_out = hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
        values = torch.nn.functional.linear(
            hf_out.hidden_states[-1], torch.as_tensor(sd["v_head.summary.weight"]), torch.as_tensor(sd["v_head.summary.bias"])
        )[..., 0].numpy()
    np.testing.assert_allclose(np.asarray(out.logits), hf_out.logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.values), values, atol=1e-5, rtol=0)


def test_scan_checkpoints_is_read_only_and_names_what_it_skips(tmp_path):
    from rljax.checkpoint import checkpoint_problem, scan_checkpoints

    d = str(tmp_path / "scan")
    with Checkpointer(d, async_save=False) as ck:
        for s in (1, 2, 3):
            ck.save(s, _small_state(seed=s))
    os.remove(os.path.join(d, "3", COMMIT_FILE))
    big = _data_files(os.path.join(d, "2"))[-1]
    with open(big, "r+b") as f:
        f.seek(0)
        f.write(b"\x00\x01\x02\x03")
    os.makedirs(os.path.join(d, "4.orbax-checkpoint-tmp"))
    before = sorted(os.listdir(d))
    committed, skipped = scan_checkpoints(d)
    assert committed == [1]
    assert [e for e, _ in skipped] == ["4.orbax-checkpoint-tmp", "3", "2"]
    assert "half-written" in skipped[0][1] and "no commit marker" in skipped[1][1] and "CRC32" in skipped[2][1]
    assert scan_checkpoints(d, checksums=False)[0] == [2, 1]  # sizes only: the flipped bytes go unnoticed
    assert sorted(os.listdir(d)) == before  # nothing moved
    assert checkpoint_problem(d) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint_problem(str(empty), what="train_state/") == "train_state/ holds no checkpoint"
    assert checkpoint_problem(str(tmp_path / "absent"), what="train_state/").startswith("no train_state/")
