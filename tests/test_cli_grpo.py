"""rljax.cli grpo / rloo: flags from GRPOConfig / RLOOConfig (the fields generated from the
algorithm's settings included, with their --help text), YAML defaults, clear errors for a
missing reward or a bad import path, and one tiny end-to-end run of each subcommand (a Python
reward function given by import path, and a reward-model checkpoint)."""
import json

import numpy as np
import pytest

from rljax import cli

SUBJECTS = ["the movie", "the film", "the plot", "the acting"]
WORDS = ["great", "wonderful", "fun", "terrible", "boring", "awful"]

REWARDS_MODULE = '''
def long_answers(prompts, completions, completion_ids, label, **kwargs):
    """One point per completion token, plus the row's label (a dataset column)."""
    return [float(len(ids)) + float(lab) for ids, lab in zip(completion_ids, label)]
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 1-layer GPT-2 + tokenizer, prompts.jsonl (prompt + label columns), a 1-logit reward
    model on the same trunk, and an importable reward module ``cli_grpo_rewards``."""
    import jax

    from rljax.data import train_tokenizer
    from rljax.models import init_params, model_from_config, save_pretrained
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import sequence_score_from_pretrained

    root = tmp_path_factory.mktemp("cli_grpo_assets")
    texts = [f"{s} was {w} ." for s in SUBJECTS for w in WORDS]
    tok = train_tokenizer(texts * 2, vocab_size=96)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    module = model_from_config(cfg)
    save_pretrained(module, init_params(module, jax.random.PRNGKey(0)), str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    score_module, score_params = sequence_score_from_pretrained(str(root / "model"), num_labels=1,
                                                                rng=jax.random.PRNGKey(1))
    save_pretrained(score_module, score_params, str(root / "rm"))
    with open(root / "prompts.jsonl", "w") as f:
        for i, s in enumerate(SUBJECTS * 2):
            f.write(json.dumps({"question": f"{s} was", "label": i % 2}) + "\n")
    (root / "cli_grpo_rewards.py").write_text(REWARDS_MODULE)
    return root


def _metrics(path):
    with open(path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_grpo_and_rloo_flags_come_from_the_configs_with_yaml_and_help(tmp_path, capsys):
    yaml = tmp_path / "grpo.yaml"
    yaml.write_text("beta: 0.04\nloss_type: dr_grpo\nnum_generations: 4\nreward_funcs: [a.b.c]\n")
    config, script = cli.parse("grpo", ["--config", str(yaml), "--temperature", "0.9", "--epsilon_high", "0.28",
                                        "--per_device_train_batch_size", "8", "--max_steps", "3"])
    assert type(config).__name__ == "GRPOConfig"
    assert (config.beta, config.loss_type, config.num_generations, config.temperature) == (0.04, "dr_grpo", 4, 0.9)
    s = config.settings()
    assert (s.epsilon_high, s.temperature, s.generation_batch_size) == (0.28, 0.9, 8)
    assert script.reward_funcs == ["a.b.c"] and script.dataset_prompt_field == "prompt"

    config, _ = cli.parse("rloo", ["--rloo_k", "4", "--kl_coef", "0", "--no_token_level_kl"])
    assert type(config).__name__ == "RLOOConfig"
    assert (config.rloo_k, config.kl_coef, config.temperature) == (4, 0.0, 0.7)  # TRL's RLOO temperature
    assert config.settings().temperature == 0.7

    with pytest.raises(SystemExit):
        cli.main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert "--num_generations" in out and "k3 estimator" in out  # text of a field generated from GRPOSettings
    with pytest.raises(SystemExit) as e:  # an invalid config is a clear error, not a traceback
        cli.main(["grpo", "--per_device_train_batch_size", "3", "--num_generations", "2"])
    assert e.value.code == 2 and "multiple of num_generations" in capsys.readouterr().err


def test_grpo_needs_a_reward_and_a_valid_import_path(assets, tmp_path):
    common = ["--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "prompts.jsonl"),
              "--dataset_prompt_field", "question", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="needs a reward"):
        cli.main(["grpo", *common])
    with pytest.raises(ValueError, match="cannot import"):
        cli.main(["grpo", *common, "--reward_funcs", "no_such_module_xyz.reward"])
    with pytest.raises(ValueError, match="no 'prompt' column"):
        cli.main(["rloo", *common[:-4], "--reward_model", str(assets / "rm"), "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_end_to_end_trains_logs_and_saves(assets, tmp_path, monkeypatch, command):
    """grpo: the Python reward function by import path (a dataset column as its keyword); rloo:
    the reward-model checkpoint. Two steps each, logged to metrics.jsonl; the policy loads."""
    monkeypatch.syspath_prepend(str(assets))
    out_dir = tmp_path / command
    common = ["--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "prompts.jsonl"),
              "--dataset_prompt_field", "question", "--max_steps", "2", "--logging_steps", "1",
              "--learning_rate", "1e-3", "--output_dir", str(out_dir)]
    if command == "grpo":
        args = [*common, "--reward_funcs", "cli_grpo_rewards.long_answers", "--per_device_train_batch_size", "4",
                "--num_generations", "2", "--max_completion_length", "4", "--beta", "0.04"]
        keys = ("reward", "reward_std", "kl", "completions/mean_length", "rewards/long_answers/mean")
    else:
        args = [*common, "--reward_model", str(assets / "rm"), "--per_device_train_batch_size", "4", "--rloo_k", "2",
                "--response_length", "4", "--num_ppo_epochs", "1"]
        keys = ("objective/scores", "objective/kl", "reward", "kl", "completion_length", "clip_ratio")
    result = cli.main([command, *args])
    assert result["global_step"] == 2
    rows = _metrics(out_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in keys:
        assert key in rows[-1] and np.isfinite(rows[-1][key]), key
    if command == "grpo":  # 1 point per token + label: at least the label mean, at most 4 + 1
        assert 0.0 <= rows[-1]["reward"] <= 5.0
    with open(out_dir / "train_results.json") as f:
        assert json.load(f)["global_step"] == 2
    from rljax.models import from_pretrained

    from_pretrained(str(out_dir))  # the trained policy loads
