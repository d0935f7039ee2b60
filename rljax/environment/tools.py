"""Local tools for ``TextEnvironment``: a calculator and a sandboxed Python-expression evaluator.

A tool is any ``callable(str) -> str``. TRL 0.7.11's examples load theirs from the hub with
``transformers.load_tool``; :func:`load_tool` keeps that path for online use, and the two
tools here cover the examples offline:

- :class:`SimpleCalculatorTool`: arithmetic (``+ - * / ** %``, parentheses, unary minus)
  parsed with ``ast`` (no ``eval``); answers like the hub's ``ybelkada/simple-calculator``
  (``"13-3" -> "10.0"``).
- :class:`PythonInterpreter`: one Python *expression* evaluated in a separate, isolated
  interpreter process with a wall-clock timeout, CPU and memory limits, no builtins beyond a
  small pure set (no ``open``, ``__import__``, ``exec``), no dunder attribute access, and
  no free file descriptors (so no files or sockets can be opened).
"""
from __future__ import annotations

import ast
import inspect
import math
import operator
import os
import subprocess
import sys
from typing import Any, Callable

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class SimpleCalculatorTool:
    """``tool("13-3") -> "10.0"``: evaluate an arithmetic expression of numbers.

    Results are floats rounded to ``decimals`` places (the hub calculator's format). A bad
    expression raises ``ValueError`` (``TextEnvironment`` turns a tool's exception into
    ``"Tool error: ..."``). Exponents are capped at ``max_exponent`` so ``9**9**9`` cannot hang.
    """

    def __init__(self, decimals: int = 2, max_exponent: float = 100.0):
        self.decimals = decimals
        self.max_exponent = max_exponent

    def _eval(self, node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return self._eval(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > self.max_exponent:
                raise ValueError(f"exponent {right} is larger than {self.max_exponent}")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"unsupported expression element {type(node).__name__}; only numbers and + - * / ** % ( )")

    def __call__(self, query: str) -> str:
        text = query.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as error:
            raise ValueError(f"cannot parse {query!r} as arithmetic") from error
        value = self._eval(tree)
        if not math.isfinite(value):
            raise ValueError(f"{query!r} is not a finite number")
        return str(round(value, self.decimals))


# The child process: read an expression on stdin, lock itself down, evaluate, print repr.
_CHILD = r"""
import ast, math, resource, sys
expr = sys.stdin.read()
cpu, mem = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (3, 3))  # stdin/out/err only: no new files or sockets
try:
    tree = ast.parse(expr.strip(), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ValueError("access to underscore attributes is not allowed")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ValueError("names starting with an underscore are not allowed")
    safe = {n: getattr(__builtins__, n) for n in (
        "abs", "all", "any", "bool", "chr", "dict", "divmod", "enumerate", "filter", "float", "int", "len", "list",
        "map", "max", "min", "ord", "pow", "range", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "zip")}
    value = eval(compile(tree, "<tool>", "eval"), {"__builtins__": safe, "math": math}, {})
    sys.stdout.write(repr(value))
except BaseException as error:
    sys.stdout.write("Error: " + type(error).__name__ + ": " + str(error))
"""


class PythonInterpreter:
    """``tool("sum(range(10))") -> "45"``: one Python expression, evaluated in a separate
    isolated process (``python -I``, empty environment, a fresh temporary working directory)
    with ``timeout`` seconds of wall clock, ``cpu_seconds`` of CPU, ``memory_bytes`` of address
    space and no free file descriptors. Only pure builtins and ``math`` are visible; names
    and attributes starting with ``_`` are refused. Returns the value's ``repr`` or
    ``"Error: ..."`` (a timeout gives ``"Error: timeout after ...s"``)."""

    def __init__(self, timeout: float = 2.0, cpu_seconds: int = 2, memory_bytes: int = 512 * 2**20,
                 max_output_chars: int = 1000):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        self.timeout = timeout
        self.cpu_seconds = max(1, int(cpu_seconds))
        self.memory_bytes = int(memory_bytes)
        self.max_output_chars = max_output_chars

    def __call__(self, query: str) -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as cwd:
            try:
                done = subprocess.run(
                    [sys.executable, "-I", "-S", "-c", _CHILD, str(self.cpu_seconds), str(self.memory_bytes)],
                    input=query, capture_output=True, text=True, timeout=self.timeout, cwd=cwd,
                    env={"PATH": os.defpath}, start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                return f"Error: timeout after {self.timeout}s"
        out = done.stdout
        if not out and done.returncode != 0:  # killed by a resource limit before it could answer
            out = f"Error: the evaluator exited with status {done.returncode}"
        return out[: self.max_output_chars]


def load_tool(task_or_repo_id: str, **kwargs: Any) -> Callable[[str], str]:
    """TRL's ``transformers.load_tool`` path for online use (needs a transformers version that
    still ships agents tools, and the hub). Offline, use :class:`SimpleCalculatorTool` /
    :class:`PythonInterpreter` or any ``callable(str) -> str``."""
    try:
        from transformers import load_tool as hf_load_tool
    except ImportError as error:
        raise ImportError(
            "transformers.load_tool is not available in this transformers version; pass a local tool instead "
            "(rljax.environment.SimpleCalculatorTool, PythonInterpreter, or any callable(str) -> str)."
        ) from error
    return hf_load_tool(task_or_repo_id, **kwargs)


def tool_name(tool: Any) -> str:
    """The name a tool is called by in ``<request><Name>``: its class name (TRL's rule for
    tool lists), or a plain function's ``__name__``."""
    if isinstance(tool, type):
        raise ValueError(f"tools must be instances or functions, got the class {tool.__name__}; pass {tool.__name__}().")
    if not callable(tool):
        raise ValueError(f"a tool must be callable(str) -> str, got {type(tool).__name__}.")
    if inspect.isfunction(tool):
        if tool.__name__ == "<lambda>":
            raise ValueError("a lambda tool has no name to call it by; pass tools as a dict {'Name': tool}.")
        return tool.__name__
    return type(tool).__name__


__all__ = ["PythonInterpreter", "SimpleCalculatorTool", "load_tool", "tool_name"]
