"""Old import path of :mod:`rljax.trainers.ppo` (kept for one release): the same module object."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("rljax.trainers.ppo")
