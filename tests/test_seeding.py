"""rljax.trainers.seeding.set_seed: Python random, NumPy (and torch when imported) seeded as
TRL's set_seed does; a JAX key returned for the script's own draws."""
import pytest


def test_set_seed_seeds_python_numpy_and_returns_a_jax_key():
    import random

    import jax
    import numpy as np

    from rljax import set_seed
    from rljax.core import LengthSampler

    key = set_seed(3)
    a = (random.random(), np.random.rand(), [LengthSampler(2, 8)() for _ in range(5)])
    key_again = set_seed(3)
    assert (random.random(), np.random.rand(), [LengthSampler(2, 8)() for _ in range(5)]) == a
    np.testing.assert_array_equal(key, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(key, key_again)
    with pytest.raises(ValueError, match="non-negative int"):
        set_seed(-1)
    with pytest.raises(ValueError, match="non-negative int"):
        set_seed(1.5)


def test_set_seed_seeds_torch_when_a_script_uses_it():
    torch = pytest.importorskip("torch")
    from rljax import set_seed

    set_seed(11)
    a = torch.rand(3)
    set_seed(11)
    assert torch.equal(torch.rand(3), a)

