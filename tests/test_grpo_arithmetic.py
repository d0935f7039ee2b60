"""experiments/grpo_arithmetic.py --fast --algos grpo: GRPO raises the greedy exact-match accuracy
on sums whose answers SFT never showed, from near chance; summary.json and the reward curve are
written. CI runs GRPO only (18.8 CPU-s cold vs ~42 with all three: compiling each algorithm's
make_train dominates); the RLOO / PPO comparison on the same task is the full run's table
(``--algos grpo,rloo,ppo``, the default), and their learning is checked in CI by
tests/test_rloo.py, tests/test_sweep.py and the PPO tests."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_grpo_arithmetic_fast_run_learns(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import grpo_arithmetic
    finally:
        sys.path.pop(0)
    grpo_arithmetic.main(["--output_dir", str(tmp_path), "--fast", "--algos", "grpo"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["grpo/accuracy_before"], summary["grpo/accuracy_after"]
    assert before < 0.1, before
    assert after > before + 0.08, (before, after)  # 0.015 -> 0.154 at seed 0
    assert summary["grpo/reward_last"] > summary["grpo/reward_first"]
    assert "rloo/accuracy_after" not in summary and "ppo/accuracy_after" not in summary
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
