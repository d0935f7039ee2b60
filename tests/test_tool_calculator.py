"""experiments/tool_calculator.py --fast: after SFT on a few tool-call demonstrations, PPO through
TextEnvironment (PPOTrainer.step with response_masks) raises the exact-answer reward on held-out
problems; summary.json, metrics.jsonl and the reward curve are written."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tool_calculator_fast_run_raises_the_held_out_reward(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import tool_calculator
    finally:
        sys.path.pop(0)
    summary = tool_calculator.main(["--output_dir", str(tmp_path), "--fast"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for key in ("tool/reward_before", "tool/reward_after", "tool/greedy_accuracy_before", "tool/greedy_accuracy_after",
                "tool/tool_call_rate_before", "tool/tool_call_rate_after", "tool/accuracy_with_tool_before",
                "tool/accuracy_with_tool_after", "tool/phase_note", "ppo/steps"):
        assert key in summary, key
    assert summary["ppo/steps"] > 0
    assert summary["tool/reward_after"] > summary["tool/reward_before"], summary["tool/phase_note"]
    assert summary["tool/reward_before"] > 0.0  # SFT taught the protocol
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == summary["ppo/steps"]
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
