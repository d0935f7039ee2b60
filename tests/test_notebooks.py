"""notebooks/*.ipynb execute top to bottom on CPU (tiny settings, ~10-20 s each); their last
cells assert that PPO's reward and DPO's held-out margin went up."""
import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def _execute(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    # RLJAX_SMOKE=1: the install cell installs nothing and keeps sizes tiny (the CI path)
    client.execute(env={**os.environ, "RLJAX_SMOKE": "1"})  # raises CellExecutionError if any cell fails
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                text.append(out["text"])
    return "".join(text)


def test_ppo_functional_notebook_raises_the_reward(tmp_path):
    out = _execute("ppo_functional.ipynb", tmp_path)
    assert "PPO iterations in" in out and "reward: first 5 iterations" in out


def test_dpo_loss_optax_notebook_raises_the_held_out_margin(tmp_path):
    out = _execute("dpo_loss_optax.ipynb", tmp_path)
    assert "held-out reward margin" in out


def test_best_of_n_notebook_beats_one_sample(tmp_path):
    out = _execute("best_of_n.ipynb", tmp_path)
    assert "mean toy reward: one sample" in out
