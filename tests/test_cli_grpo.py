"""rljax.cli grpo / rloo: flags from GRPOConfig / RLOOConfig (the fields generated from the
algorithm's settings included, with their --help text), YAML defaults, clear errors for a
missing reward or a bad import path, and one tiny end-to-end run of each subcommand (a Python
reward function given by import path, and a reward-model checkpoint) that saves checkpoints and
is resumed from one."""
import json

import numpy as np
import pytest

from rljax import cli

SUBJECTS = ["the movie", "the film", "the plot", "the acting"]
WORDS = ["great", "wonderful", "fun", "terrible", "boring", "awful"]

REWARDS_MODULE = '''
SEEN = {}


def odd_tokens(prompts, completions, completion_ids, label, **kwargs):
    """One point per odd token id of the completion (varies within a group), plus the row's label
    (a dataset column)."""
    SEEN.setdefault("prompts", list(prompts))
    return [float(sum(t % 2 for t in ids)) + float(lab) for ids, lab in zip(completion_ids, label)]


def not_applicable(prompts, completions, **kwargs):
    """TRL's None: "this reward does not apply" (counted as 0 in the weighted sum)."""
    return [None] * len(completions)
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


def _params(path):
    import jax

    from rljax.models import from_pretrained

    _, params = from_pretrained(str(path))  # the policy saved there loads
    return jax.tree_util.tree_leaves(params)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_end_to_end_trains_logs_saves_and_resumes(assets, tmp_path, monkeypatch, command):
    """The GRPOTrainer / RLOOTrainer shells through the CLI. grpo: two Python reward functions by
    import path (a dataset column as a keyword, one returning None: "not applicable"; weighted),
    called once per step on groups of completions; rloo: the reward-model checkpoint. Three steps
    each, logged to metrics.jsonl (TRL's keys), checkpoints at steps 2 and 3 (--save_steps 2, and
    the end); then a second run resumes from checkpoint-2 into another output_dir
    (--resume_from_checkpoint): its step 3 (prompts, samples, rewards, update) and its final policy
    equal the uninterrupted run's."""
    monkeypatch.syspath_prepend(str(assets))
    out_dir = tmp_path / command
    common = ["--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "prompts.jsonl"),
              "--dataset_prompt_field", "question", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "2",
              "--learning_rate", "1e-2"]
    if command == "grpo":
        args = [*common, "--reward_funcs", "cli_grpo_rewards.odd_tokens", "cli_grpo_rewards.not_applicable",
                "--reward_weights", "1.0", "2.0", "--per_device_train_batch_size", "4", "--num_generations", "2",
                "--max_completion_length", "4", "--max_prompt_length", "8", "--beta", "0.04"]
        keys = ("reward", "reward_std", "kl", "completions/mean_length", "clip_ratio/region_mean", "loss", "entropy",
                "rewards/odd_tokens/mean")
    else:
        args = [*common, "--reward_model", str(assets / "rm"), "--per_device_train_batch_size", "4", "--rloo_k", "2",
                "--response_length", "4", "--num_ppo_epochs", "1"]
        keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "policy/clipfrac_avg", "val/ratio",
                "reward", "kl", "completion_length", "clip_ratio")
    result = cli.main([command, *args, "--output_dir", str(out_dir)])
    assert result["global_step"] == 3
    rows = _metrics(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in keys:
        assert key in rows[-1] and np.isfinite(rows[-1][key]), key
    if command == "grpo":  # 1 point per odd token + label (+ 2 x None = 0): from 0 to 4 + 1
        assert 0.0 <= rows[-1]["reward"] <= 5.0 and rows[-1]["reward_std"] > 0.0
        assert "rewards/not_applicable/mean" in rows[-1]  # all None: NaN, not an error
        import cli_grpo_rewards

        prompts = cli_grpo_rewards.SEEN["prompts"]
        assert len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3]  # 2 groups of 2
    with open(out_dir / "train_results.json") as f:
        assert json.load(f)["global_step"] == 3
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    final = _params(out_dir)

    resumed_dir = tmp_path / f"{command}_resumed"
    result = cli.main([command, *args, "--output_dir", str(resumed_dir),
                       "--resume_from_checkpoint", str(out_dir / "checkpoint-2")])
    assert result["global_step"] == 3
    (resumed,) = _metrics(resumed_dir)  # only the step it ran
    assert resumed.keys() == rows[2].keys()
    np.testing.assert_allclose([resumed[k] for k in rows[2]], list(rows[2].values()), rtol=1e-6, atol=1e-7)
    for x, y in zip(_params(resumed_dir), final):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    before = _params(out_dir / "checkpoint-2")
    assert any(not np.allclose(x, y) for x, y in zip(before, final))  # step 3 did change the params
