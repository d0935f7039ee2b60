"""Tool use (TRL 0.7.11's ``trl.environment``): ``TextHistory``, ``TextEnvironment`` and local
tools (:mod:`rljax.environment.tools`)."""
from rljax.environment.history import TextHistory
from rljax.environment.text_environment import TextEnvironment
from rljax.environment.tools import PythonInterpreter, SimpleCalculatorTool, load_tool

__all__ = ["PythonInterpreter", "SimpleCalculatorTool", "TextEnvironment", "TextHistory", "load_tool"]
