"""TRL 0.7.11's example scripts in their rljax versions (experiments/hello_world.py,
experiments/scripts/{sft,reward_modeling,dpo,ppo}.py) run as subprocesses on tiny offline assets
and tiny flags: each exits 0 and writes what it should.

A module fixture runs all scripts one after another in ONE subprocess
(tests/_examples_driver.py: each script as ``__main__`` through runpy, with its own argv, working
directory and log; one Python + JAX + transformers start-up instead of five); each test then
checks one script's result.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
SCRIPTS = os.path.join(EXPERIMENTS, "scripts")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_examples_driver.py")
TRAINER_FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1"]

# hello_world.py only defines variables (as TRL's): run it through runpy to report what it computed.
HELLO_WORLD = (
    "import json, runpy, sys; sys.argv = ['hello_world.py']; "
    f"g = runpy.run_path({os.path.join(EXPERIMENTS, 'hello_world.py')!r}, run_name='__main__'); "
    "print('HELLO_WORLD ' + json.dumps({'stats': sorted(g['train_stats']), 'response': g['response_txt'], "
    "'steps': g['ppo_trainer'].current_step}))"
)

RUNS = {
    "hello_world": ["-c", HELLO_WORLD],
    "sft": [os.path.join(SCRIPTS, "sft.py"), *TRAINER_FLAGS, "--max_seq_length", "32", "--output_dir", "out_sft"],
    "reward_modeling": [os.path.join(SCRIPTS, "reward_modeling.py"), *TRAINER_FLAGS, "--max_length", "48",
                        "--output_dir", "out_reward"],
    "dpo": [os.path.join(SCRIPTS, "dpo.py"), *TRAINER_FLAGS, "--max_length", "48", "--max_prompt_length", "24",
            "--output_dir", "out_dpo"],
    # 8 imdb-like prompts / batch_size 4: TRL's loop makes 2 PPO steps
    "ppo": [os.path.join(SCRIPTS, "ppo.py"), "--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "1",
            "--log_with", "jsonl"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{script: (returncode, output, working directory)} for every script in RUNS."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    from _offline import ASSETS_ENV, offline_assets
    work = tmp_path_factory.mktemp("examples")
    assets = str(work / "assets")
    offline_assets(assets, n_reviews=160, n_pairs=32, n_imdb=8, vocab_size=300, n_embd=32, n_layer=2, n_head=2)
    env = dict(os.environ, **{ASSETS_ENV: assets, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                              "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false",
                              "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT})
    plan = []
    for name, argv in RUNS.items():
        (work / name).mkdir()
        plan.append({"name": name, "argv": argv, "cwd": str(work / name)})
    (work / "plan.json").write_text(json.dumps(plan))
    log = work / "driver.log"
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, DRIVER, str(work / "plan.json"), str(work / "results.json")], cwd=work,
                           env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
        except subprocess.TimeoutExpired:
            pass
    codes = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    results = {}
    for name in RUNS:
        out = (work / name / "output.log").read_text() if (work / name / "output.log").exists() else ""
        if name not in codes:
            out += "\n[driver] did not finish this script; driver log:\n" + log.read_text()[-4000:]
        results[name] = (codes.get(name, -1), out, work / name)
    return results


def _ok(runs, name):
    code, out, cwd = runs[name]
    assert code == 0, f"{name} exited {code}:\n{out[-4000:]}"
    return out, cwd


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_hello_world_generates_and_takes_one_ppo_step(runs):
    out, _ = _ok(runs, "hello_world")
    report = json.loads(out.split("HELLO_WORLD ", 1)[1].splitlines()[0])
    assert report["steps"] == 1 and isinstance(report["response"], str)
    for key in ("objective/kl", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "time/ppo/total"):
        assert key in report["stats"], key


def test_sft_script_trains_and_saves(runs):
    out, cwd = _ok(runs, "sft")
    assert "[offline] sft" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (cwd / "out_sft" / name).is_file(), name
    rows = _jsonl(cwd / "out_sft" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]


def test_reward_modeling_script_trains_a_sequence_classifier(runs):
    _, cwd = _ok(runs, "reward_modeling")
    with open(cwd / "out_reward" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config.get("num_labels", 1) == 1
    assert (cwd / "out_reward" / "model.safetensors").is_file()
    assert any("accuracy" in r for r in _jsonl(cwd / "out_reward" / "metrics.jsonl"))


def test_dpo_script_trains_on_hh_style_dialogues(runs):
    _, cwd = _ok(runs, "dpo")
    assert (cwd / "out_dpo" / "model.safetensors").is_file()
    rows = _jsonl(cwd / "out_dpo" / "metrics.jsonl")
    assert any("rewards/margins" in r for r in rows) and any("rewards/accuracies" in r for r in rows)


def test_ppo_script_runs_trls_loop_and_logs(runs):
    _, cwd = _ok(runs, "ppo")
    rows = _jsonl(cwd / "runs" / "ppo" / "metrics.jsonl")  # PPOConfig.exp_name is the script's name
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total"):
        assert key in rows[0], key
    samples = _jsonl(cwd / "runs" / "ppo" / "samples.jsonl")
    assert len(samples) == 8 and {"query", "response", "ref_response", "ref_rewards", "reward"} <= set(samples[0])


def test_offline_defaults_apply_only_without_a_model_flag(runs, monkeypatch):
    """The scripts' one addition: offline stand-ins as parser defaults unless the model flag is
    given, abbreviated as argparse allows (TRL's CI runs sft.py with --model_name); flags win."""
    from _offline import ASSETS_ENV, set_offline_defaults
    from transformers import HfArgumentParser

    from rljax import ModelConfig, TrainingArguments

    monkeypatch.setenv(ASSETS_ENV, str(runs["sft"][2].parent / "assets"))
    for argv in (["--model_name_or_path", "gpt2"], ["--model_name=gpt2"], ["--model_name", "gpt2"]):
        parser = HfArgumentParser((TrainingArguments, ModelConfig))
        assert set_offline_defaults(parser, "sft", argv) is None
        _, model_config = parser.parse_args_into_dataclasses(argv)
        assert model_config.model_name_or_path == "gpt2"
    parser = HfArgumentParser((TrainingArguments, ModelConfig))
    assets = set_offline_defaults(parser, "dpo", ["--learning_rate", "0.1"])
    training_args, model_config, *_ = parser.parse_args_into_dataclasses(["--learning_rate", "0.1"])  # + DPO's extras
    assert model_config.model_name_or_path == assets["model"] and training_args.max_steps == 60
    assert training_args.learning_rate == 0.1
