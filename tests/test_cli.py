"""rljax.cli: flags from the config dataclasses, YAML defaults, clear errors, --help, and every
subcommand end to end for a few steps on a tiny checkpoint and datasets written to tmp_path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rljax import cli

POSITIVE = ["great", "wonderful", "fun", "lovely", "good"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "bad"]
SUBJECTS = ["the movie", "the film", "the plot", "the acting"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 1-layer GPT-2 + tokenizer directory, a text dataset (.jsonl), preference pairs
    (.json with train/test splits) and the pairs as a save_to_disk directory."""
    import datasets
    import jax

    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config

    root = tmp_path_factory.mktemp("cli_assets")
    rng = np.random.default_rng(0)
    texts = [f"{s} was {w} ." for s in SUBJECTS for w in POSITIVE + NEGATIVE]
    tok = train_tokenizer(texts * 2, vocab_size=96)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    module = model_from_config(cfg)
    save_pretrained(module, init_params(module, jax.random.PRNGKey(0)), str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    with open(root / "texts.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    pairs = [{"prompt": s, "chosen": f" was {rng.choice(POSITIVE)} .", "rejected": f" was {rng.choice(NEGATIVE)} ."}
             for s in SUBJECTS * 6]
    with open(root / "pairs.json", "w") as f:
        json.dump({"train": pairs[:16], "test": pairs[16:]}, f)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs[:16])}).save_to_disk(str(root / "pairs_ds"))
    return root


def _write_yaml(path, text):
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg_file = _write_yaml(tmp_path / "sft.yaml", "learning_rate: 1e-4\nmax_steps: 7\npacking: true\n"
                           "model_name_or_path: some/model\nreport_to: [tensorboard]\n")
    config, script = cli.parse("sft", ["--config", cfg_file, "--max_steps", "9", "--seed", "3"])
    assert config.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string: coerced to float
    assert config.max_steps == 9 and config.seed == 3 and config.packing is True
    assert config.report_to == ["tensorboard"] and script.model_name_or_path == "some/model"
    assert script.config == cfg_file and type(config).__name__ == "SFTConfig"

    dpo_yaml = _write_yaml(tmp_path / "dpo.yaml", "beta: 0.5\nloss_type: hinge\n")
    config, _ = cli.parse("dpo", [f"--config={dpo_yaml}", "--loss_type", "ipo", "--learning_rate", "2e-5"])
    assert (config.beta, config.loss_type, config.learning_rate) == (0.5, "ipo", 2e-5)


def test_hf_style_booleans_and_none(tmp_path):
    config, _ = cli.parse("sft", ["--packing", "True", "--disable_tqdm=false", "--max_grad_norm", "None"])
    assert config.packing is True and config.disable_tqdm is False and config.max_grad_norm is None
    config, _ = cli.parse("sft", ["--no_packing", "--logging_first_step"])
    assert config.packing is False and config.logging_first_step is True


def test_every_trl_field_is_a_flag():
    import dataclasses

    from rljax.ppo import PPOConfig

    config, script = cli.parse("ppo", ["--batch_size", "8", "--mini_batch_size", "4", "--init_kl_coef", "0.05",
                                       "--kl_penalty", "abs", "--log_with", "jsonl", "--max_new_tokens", "5",
                                       "--reward_model", "rm_dir", "--tracker_kwargs", "name", "run1"])
    assert isinstance(config, PPOConfig) and config.backward_batch_size == 4  # __post_init__ ran
    assert (config.batch_size, config.init_kl_coef, config.kl_penalty, config.log_with) == (8, 0.05, "abs", "jsonl")
    assert config.reward_model == "rm_dir" and config.tracker_kwargs == {"name": "run1"}
    assert script.max_new_tokens == 5
    flags = {f.name for f in cli._flag_fields(PPOConfig, cli.PPOScriptArguments)}
    hidden = {"world_size", "is_encoder_decoder", "is_peft_model", "backward_batch_size", "global_backward_batch_size",
              "global_batch_size"}  # runtime fields, suppressed as in PPOConfig
    assert {f.name for f in dataclasses.fields(PPOConfig)} - hidden <= flags and not hidden & flags


def test_unknown_yaml_key_is_a_clear_error(tmp_path, capsys):
    bad = _write_yaml(tmp_path / "bad.yaml", "learning_rate: 1.0e-4\nlearnin_rate: 3\nbogus: 1\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['bogus', 'learnin_rate'\].*Valid keys: .*learning_rate"):
        cli.parse("reward", ["--config", bad])
    with pytest.raises(SystemExit) as e:
        cli.main(["reward", "--config", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "rljax reward: error: Unknown key(s)" in err and "per_device_train_batch_size" in err
    with pytest.raises(ValueError, match="cannot read 'fast' as float"):
        cli.parse("sft", ["--config", _write_yaml(tmp_path / "t.yaml", "learning_rate: fast\n")])


def test_invalid_config_values_are_reported_not_raised(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo", "--batch_size", "10", "--mini_batch_size", "4"])
    assert e.value.code == 2 and "must be a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sft", "--not_a_flag", "1"])
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        cli.main(["train"])
    with pytest.raises(ValueError, match="Unknown logging sink 'mlflow'"):
        cli.parse("sft", ["--report_to", "mlflow"])


def test_missing_tracker_package_fails_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboardX") else real(name, *a))
    with pytest.raises(ValueError, match="pip install tensorboardX"):
        cli.parse("dpo", ["--report_to", "tensorboard"])
    with pytest.raises(ValueError, match="pip install wandb"):
        cli.parse("ppo", ["--log_with", "wandb"])


def test_help_lists_fields_with_defaults_and_docs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--beta FLOAT", "(default: 0.1)", "--loss_type", "--learning_rate FLOAT", "(default: 5e-05)",
                   "--model_name_or_path", "--dataset_name", "--resume_from_checkpoint", "--config",
                   "Peak AdamW learning rate", "DPO temperature"):
        assert needle in out, needle
    cfg_file = _write_yaml(tmp_path / "c.yaml", "learning_rate: 0.003\n")
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--config", cfg_file, "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.003)" in out and "--cliprange FLOAT" in out and "--max_new_tokens INT" in out
    assert cli.main([]) is None and "subcommands:" in capsys.readouterr().out


def test_python_dash_m_rljax_prints_usage():
    r = subprocess.run([sys.executable, "-m", "rljax"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "rljax {sft,reward,ppo,dpo,grpo,rloo}" in r.stdout


def test_dataset_loading_from_files_and_directories(tmp_path, assets):
    train, test = cli.load_dataset_splits(str(assets / "pairs.json"))
    assert len(train) == 16 and len(test) == 8 and set(train.column_names) == {"prompt", "chosen", "rejected"}
    train, test = cli.load_dataset_splits(str(assets / "texts.jsonl"))
    assert test is None and train[0]["text"].startswith("the movie")
    train, test = cli.load_dataset_splits(str(assets / "pairs_ds"))
    assert len(train) == 16 and test is None
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"text": ["a", "b"], "label": [0, 1]}))
    assert cli.load_dataset_splits(str(cols))[0][1] == {"text": "b", "label": 1}
    with pytest.raises(ValueError, match="no split 'validation'"):
        cli.load_dataset_splits(str(assets / "pairs.json"), train_split="validation")


def test_dataset_loading_every_file_format(tmp_path):
    """JSON rows, JSONL, CSV and Parquet files go through datasets.load_dataset(builder, data_files=...);
    a directory of files named by split gives those splits; unknown formats are a clear error."""
    import datasets

    rows = [{"text": "a good film", "label": 1}, {"text": "a dull film", "label": 0}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.csv").write_text("text,label\na good film,1\na dull film,0\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("rows.json", "rows.jsonl", "rows.csv", "rows.parquet"):
        train, test = cli.load_dataset_splits(str(tmp_path / name))
        assert test is None and train.to_list() == rows, name

    split_dir = tmp_path / "by_split"
    split_dir.mkdir()
    (split_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (split_dir / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    train, test = cli.load_dataset_splits(str(split_dir))
    assert len(train) == 2 and test.to_list() == rows[:1]

    bad = tmp_path / "data.txt"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown data file format '.txt'.*\.csv.*\.jsonl.*\.parquet"):
        cli.load_dataset_splits(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        cli.load_dataset_splits(str(tmp_path / "missing.csv"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="neither a datasets.save_to_disk directory"):
        cli.load_dataset_splits(str(tmp_path / "empty_dir"))


# --------------------------------------------------------------------------
# End to end (a few steps each, on the tiny checkpoint)
# --------------------------------------------------------------------------

TRAINER_FLAGS = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "2",
                 "--learning_rate", "1e-3", "--disable_tqdm", "--save_steps", "2"]


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_end_to_end_and_bitwise_resume(assets, tmp_path):
    from safetensors.numpy import load_file

    common = ["--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "texts.jsonl"),
              "--max_seq_length", "16", *TRAINER_FLAGS]
    out = cli.main(["sft", *common, "--output_dir", str(tmp_path / "a")])
    assert np.isfinite(out["loss"]) and [m["step"] for m in _metrics(tmp_path / "a")] == [2, 4]
    assert (tmp_path / "a" / "checkpoint-2" / "train_state").is_dir()
    from rljax.models import from_pretrained

    from_pretrained(str(tmp_path / "a"))  # the saved model loads

    cli.main(["sft", *common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint",
              str(tmp_path / "a" / "checkpoint-2")])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in _metrics(tmp_path / "b")] == [4]


def test_reward_end_to_end_with_yaml_and_eval_split(assets, tmp_path):
    cfg_file = _write_yaml(tmp_path / "rm.yaml", f"model_name_or_path: {assets / 'model'}\n"
                           f"dataset_name: {assets / 'pairs.json'}\nmax_length: 24\nlearning_rate: 1.0e-3\n")
    out = cli.main(["reward", "--config", cfg_file, *TRAINER_FLAGS, "--save_strategy", "no",
                    "--output_dir", str(tmp_path / "rm")])
    assert 0.0 <= out["eval_accuracy"] <= 1.0 and np.isfinite(out["eval_loss"])
    with open(tmp_path / "rm" / "config.json") as f:
        assert json.load(f)["architectures"] == ["GPT2ForSequenceClassification"]
    with open(tmp_path / "rm" / "train_results.json") as f:
        assert "eval_accuracy" in json.load(f)


def test_dpo_end_to_end_from_a_saved_dataset_directory(assets, tmp_path):
    out = cli.main(["dpo", "--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "pairs_ds"),
                    "--max_length", "24", "--max_prompt_length", "8", "--beta", "0.1", *TRAINER_FLAGS,
                    "--save_strategy", "no", "--output_dir", str(tmp_path / "dpo")])
    assert np.isfinite(out["loss"]) and "rewards/margins" in out
    assert "rewards/accuracies" in _metrics(tmp_path / "dpo")[-1]


@pytest.mark.slow
def test_ppo_end_to_end_logs_samples_checkpoints_and_resumes(assets, tmp_path):
    import jax

    from rljax.models import save_pretrained
    from rljax.models.heads import sequence_score_from_pretrained

    rm = tmp_path / "rm"  # a reward-model checkpoint: the tiny trunk with a fresh 1-logit score head
    score_module, score_params = sequence_score_from_pretrained(str(assets / "model"), num_labels=1,
                                                                rng=jax.random.PRNGKey(1))
    save_pretrained(score_module, score_params, str(rm))
    log_with = "tensorboard" if cli_has("tensorboardX") else "jsonl"
    ppo = ["ppo", "--model_name_or_path", str(assets / "model"), "--reward_model", str(rm), "--dataset_name",
           str(assets / "texts.jsonl"), "--batch_size", "4", "--mini_batch_size", "4", "--ppo_epochs", "1",
           "--max_prompt_length", "3", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--steps_per_call", "1",
           "--save_steps", "1", "--sample_every", "2", "--log_with", log_with, "--output_dir", str(tmp_path / "ppo")]
    out = cli.main([*ppo, "--steps", "8"])  # ceil(8 / batch_size) = 2 iterations
    assert out["ppo/iterations"] == 2 and np.isfinite(out["objective/kl"])
    rows = _metrics(tmp_path / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/policy/clipfrac"):
        assert key in rows[0], key
    assert sorted(os.listdir(tmp_path / "ppo" / "checkpoints")) == ["1", "2"]
    with open(tmp_path / "ppo" / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert {s["step"] for s in samples} == {0, 2} and {"query", "response", "reward"} <= set(samples[0])
    if log_with == "tensorboard":
        assert os.listdir(tmp_path / "ppo" / "runs")
    from rljax.models import AutoModelForCausalLMWithValueHead

    AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "ppo"))  # policy + value head saved

    # Continue the same run to 3 iterations from its newest checkpoint (iteration 2).
    out = cli.main([*ppo, "--steps", "12", "--resume_from_checkpoint", str(tmp_path / "ppo")])
    assert out["ppo/iterations"] == 3
    assert [r["step"] for r in _metrics(tmp_path / "ppo")] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "ppo" / "checkpoints")) == ["1", "2", "3"]

    with pytest.raises(FileExistsError, match="resume=True"):  # a fresh run does not clobber checkpoints
        cli.main([*ppo, "--steps", "8"])


def cli_has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
