"""The README's main job: the offline SFT -> reward model -> PPO -> DPO demo, CI-sized."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


@pytest.mark.slow
def test_quickstart_fast_learns_end_to_end(tmp_path):
    import quickstart

    out = tmp_path / "qs"
    summary = quickstart.main(["--output_dir", str(out), "--fast"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["ppo/reward_after"] == pytest.approx(summary["ppo/reward_after"])
    # each phase measurably learns
    assert summary["sft/eval_loss"] < 0.5 * summary["sft/eval_loss_before"]
    assert summary["rm/accuracy"] >= 0.85
    assert summary["ppo/reward_after"] > summary["ppo/reward_before"] + 0.3
    assert summary["ppo/vader_after"] > summary["ppo/vader_before"] + 0.3  # the held-out judge agrees
    assert summary["ppo/kl"] < 30.0
    assert summary["dpo/rewards_accuracy"] > summary["dpo/rewards_accuracy_before"]
    for name in ("samples.md", "ppo_reward_kl.png", "ppo_metrics.jsonl"):
        assert (out / name).exists(), name
    # the exported policy is an HF checkpoint transformers can load
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "ppo_policy")
    assert model.config.model_type == "gpt2"
