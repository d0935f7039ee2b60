"""rljax.logging: JSONL content, array handling, samples, TensorBoard / W&B sinks (real
tensorboardX when installed, a clear error when not), and TrainingArguments.report_to."""
import json
import os
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rljax.logging import MetricLogger, resolve_sink_names, split_stats


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _stats():
    """A TRL-like PPO stats dict: scalars of every flavour, arrays, and a non-numeric entry."""
    return {
        "objective/kl": np.float32(0.5),
        "objective/kl_coef": jnp.asarray(0.2),
        "ppo/loss/total": jnp.asarray([1.5]),  # size-1 array: a scalar
        "env/reward_mean": 2.0,
        "ppo/minibatches_skipped": 0,
        "env/reward_dist": np.array([1.0, 2.0, 3.0]),
        "ppo/policy/advantages": jnp.asarray([[-1.0, 1.0], [np.nan, 3.0]]),  # NaN padding is left out
        "ppo/val/error": float("nan"),
        "game_log_note": "text is not a metric",
    }


def test_split_stats_separates_scalars_arrays_and_ignores_the_rest():
    scalars, arrays = split_stats(_stats())
    assert scalars["objective/kl"] == 0.5 and scalars["ppo/loss/total"] == 1.5
    assert abs(scalars["objective/kl_coef"] - 0.2) < 1e-7 and scalars["ppo/minibatches_skipped"] == 0.0
    assert set(arrays) == {"env/reward_dist", "ppo/policy/advantages"}
    assert arrays["ppo/policy/advantages"].shape == (4,)
    assert "game_log_note" not in scalars


def test_jsonl_sink_writes_scalars_and_array_summaries_as_strict_json(tmp_path):
    with MetricLogger("jsonl", str(tmp_path)) as logger:
        logger.log(_stats(), step=3)
        logger.log({"loss": 1.0}, step=4)
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4]
    r = rows[0]
    assert r["objective/kl"] == 0.5 and r["env/reward_mean"] == 2.0 and r["ppo/loss/total"] == 1.5
    assert r["env/reward_dist/mean"] == 2.0 and r["env/reward_dist/min"] == 1.0 and r["env/reward_dist/max"] == 3.0
    assert r["env/reward_dist/std"] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert r["ppo/policy/advantages/mean"] == pytest.approx(1.0)  # mean of the finite entries
    assert r["ppo/val/error"] is None  # NaN -> null (strict JSON)
    assert "env/reward_dist" not in r and "game_log_note" not in r
    with open(tmp_path / "metrics.jsonl") as f:
        assert "NaN" not in f.read()


def test_arrays_drop_mode_keeps_only_scalars(tmp_path):
    with MetricLogger(["jsonl"], str(tmp_path), arrays="drop") as logger:
        logger.log(_stats(), step=1)
    (r,) = _read_jsonl(tmp_path / "metrics.jsonl")
    assert not any(k.startswith(("env/reward_dist", "ppo/policy/advantages")) for k in r)
    assert r["objective/kl"] == 0.5


def test_log_samples_every_n_steps_to_jsonl_and_markdown(tmp_path):
    rows = [
        {"query": "the movie", "response": " was great | fun", "reward": np.float32(0.75)},
        {"query": "the plot", "response": " was dull", "reward": jnp.asarray(-0.5)},
    ]
    with MetricLogger("jsonl", str(tmp_path), sample_every=2) as logger:
        assert not logger.log_samples(rows, step=1)
        assert logger.log_samples(rows, step=2)
        assert logger.log_samples({"query": ["a"], "response": ["b"], "reward": [1.0]}, step=3, force=True)
    samples = _read_jsonl(tmp_path / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 3]
    assert samples[0] == {"step": 2, "query": "the movie", "response": " was great | fun", "reward": 0.75}
    md = (tmp_path / "samples.md").read_text()
    assert "## step 2" in md and "| query | response | reward |" in md and "great \\| fun" in md
    assert "## step 1" not in md


def test_stdout_sink_prints_selected_keys(capsys):
    with MetricLogger("stdout", stdout_keys=["env/reward_mean", "objective/kl"]) as logger:
        logger.log(_stats(), step=7)
    out = capsys.readouterr().out
    assert "step 7" in out and "env/reward_mean 2" in out and "objective/kl 0.5" in out
    assert "ppo/loss/total" not in out


def test_sink_names_resolve_and_unknown_names_fail():
    assert resolve_sink_names(None) == [] and resolve_sink_names("none") == []
    assert resolve_sink_names("tqdm,jsonl") == ["stdout", "jsonl"]
    assert resolve_sink_names(["TensorBoard", "tensorboard"]) == ["tensorboard"]
    assert resolve_sink_names("all")[:2] == ["stdout", "jsonl"]
    with pytest.raises(ValueError, match="Unknown logging sink 'mlflow'.*valid"):
        resolve_sink_names(["mlflow"])
    with pytest.raises(ValueError, match="output_dir"):
        MetricLogger("jsonl")


# --------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------


def _read_events(logdir):
    """Every tensorboardX Event in ``logdir`` (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12 : i + 12 + n])
            events.append(ev)
            i += 12 + n + 4
    return events


def test_tensorboard_sink_writes_scalars_histograms_and_samples(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricLogger(["tensorboard"], str(tmp_path), config={"lr": 1e-3}) as logger:
        logger.log(_stats(), step=1)
        logger.log({"objective/kl": 0.25}, step=2)
        logger.log_samples([{"query": "q", "response": "r", "reward": 1.0}], step=2)
    events = _read_events(tmp_path / "runs")
    values = [(e.step, v) for e in events if e.HasField("summary") for v in e.summary.value]
    scalars = {(s, v.tag): v.simple_value for s, v in values if v.HasField("simple_value")}
    assert scalars[(1, "objective/kl")] == 0.5 and scalars[(2, "objective/kl")] == 0.25
    assert scalars[(1, "env/reward_mean")] == 2.0
    histos = {(s, v.tag): v.histo for s, v in values if v.HasField("histo")}
    assert histos[(1, "env/reward_dist")].num == 3 and histos[(1, "env/reward_dist")].max == 3.0
    assert histos[(1, "ppo/policy/advantages")].num == 3  # the NaN entry is left out
    assert any(v.tag.startswith("game_log") for _, v in values)


def test_tensorboard_missing_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install tensorboardX"):
        MetricLogger(["jsonl", "tensorboard"], str(tmp_path))


# --------------------------------------------------------------------------
# Weights & Biases (a stand-in module records the calls; the real one is optional)
# --------------------------------------------------------------------------


def _fake_wandb():
    calls = {"init": [], "log": [], "finish": 0}
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, payload, step=None):
            calls["log"].append((step, payload))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    mod.init = init
    mod.Histogram = lambda values: ("histogram", np.asarray(values).tolist())
    mod.Table = lambda columns, data: ("table", list(columns), data)
    return mod, calls


def test_wandb_sink_logs_scalars_histograms_and_a_game_log_table(tmp_path, monkeypatch):
    mod, calls = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", mod)
    with MetricLogger(["wandb"], str(tmp_path), config={"lr": 1e-3}, project_name="trl",
                      tracker_kwargs={"name": "run-1"}) as logger:
        logger.log(_stats(), step=5)
        logger.log_samples([{"query": "q", "response": "r", "reward": 1.0}], step=5)
    (init,) = calls["init"]
    assert init["project"] == "trl" and init["name"] == "run-1" and init["config"] == {"lr": 0.001}
    step, payload = calls["log"][0]
    assert step == 5 and payload["objective/kl"] == 0.5
    assert payload["env/reward_dist"] == ("histogram", [1.0, 2.0, 3.0])
    assert calls["log"][1] == (5, {"game_log": ("table", ["query", "response", "reward"], [["q", "r", 1.0]])})
    assert calls["finish"] == 1


def test_wandb_missing_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install wandb"):
        MetricLogger("wandb", str(tmp_path))


# --------------------------------------------------------------------------
# TrainingArguments.report_to in the Trainer shell
# --------------------------------------------------------------------------


def _toy_trainer(output_dir, **overrides):
    """A Trainer on a 3-parameter least-squares problem (compiles in well under a second)."""
    from rljax.trainers.base import Trainer, TrainingArguments

    class Toy(Trainer):
        def loss_fn(self, params, batch, rng):
            err = batch["x"] @ params["w"] - batch["y"]
            return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}

        def collate(self, examples):
            return {k: np.stack([e[k] for e in examples]).astype(np.float32) for k in ("x", "y")}

        def _save(self, output_dir):
            os.makedirs(output_dir, exist_ok=True)

    rng = np.random.default_rng(0)
    data = [{"x": x, "y": np.float32(x @ [1.0, -2.0, 0.5])} for x in rng.normal(size=(32, 3)).astype(np.float32)]
    kwargs = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, logging_steps=2,
                  learning_rate=0.1, save_strategy="no", disable_tqdm=True)
    args = TrainingArguments(**{**kwargs, **overrides})
    return Toy(None, {"w": jnp.zeros(3)}, args, train_dataset=data)


def test_report_to_tensorboard_adds_a_sink_and_keeps_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboardX")
    trainer = _toy_trainer(tmp_path / "out", report_to=["tensorboard"])
    trainer.train()
    rows = _read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and "loss" in rows[0]
    events = _read_events(tmp_path / "out" / "runs")
    tags = {(e.step, v.tag) for e in events if e.HasField("summary") for v in e.summary.value}
    assert {(2, "loss"), (4, "loss"), (4, "abs_err"), (4, "learning_rate")} <= tags


def test_report_to_none_writes_only_metrics_jsonl(tmp_path):
    trainer = _toy_trainer(tmp_path / "out")
    trainer.train()
    assert sorted(os.listdir(tmp_path / "out")) == ["metrics.jsonl"]
    with pytest.raises(ValueError, match="Unknown logging sink"):
        _toy_trainer(tmp_path / "bad", report_to=["mlflow"]).train()
