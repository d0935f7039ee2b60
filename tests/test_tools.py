"""rljax.environment.tools: the calculator and the sandboxed Python-expression evaluator."""
import time

import pytest

from rljax.environment.tools import PythonInterpreter, SimpleCalculatorTool, load_tool, tool_name


def test_calculator_answers_like_the_hub_tool():
    calc = SimpleCalculatorTool()
    assert calc("13-3") == "10.0"
    assert calc("4*3") == "12.0"
    assert calc(" (2 + 3) * -4 ") == "-20.0"
    assert calc("7/2") == "3.5"
    assert calc("2^10") == "1024.0"
    assert calc("1/3") == "0.33"


@pytest.mark.parametrize("bad", ["__import__('os')", "a + 1", "1 +", "9**9**9", "1/0", "[1, 2]"])
def test_calculator_refuses_anything_but_arithmetic(bad):
    with pytest.raises((ValueError, ZeroDivisionError)):
        SimpleCalculatorTool()(bad)


@pytest.fixture(scope="module")
def python():
    return PythonInterpreter(timeout=5.0, cpu_seconds=2)


def test_python_interpreter_evaluates_expressions(python):
    assert python("sum(range(10))") == "45"
    assert python("math.sqrt(16) + max([1, 5, 3])") == "9.0"
    assert python("sorted({'b': 1, 'a': 2})") == "['a', 'b']"


@pytest.mark.parametrize("expr, error", [
    ("open('/etc/passwd').read()", "NameError"),
    ("__import__('os').system('echo hi')", "ValueError"),
    ("().__class__.__bases__[0].__subclasses__()", "ValueError"),
    ("exec('x = 1')", "NameError"),
    ("import os", "SyntaxError"),
    ("1/0", "ZeroDivisionError"),
])
def test_python_interpreter_has_no_file_network_or_import_access(python, expr, error):
    out = python(expr)
    assert out.startswith("Error: " + error), out


def test_python_interpreter_times_out():
    start = time.time()
    out = PythonInterpreter(timeout=1.0, cpu_seconds=10)("sum(range(10**12))")
    assert out.startswith("Error:") and time.time() - start < 5
    assert "timeout" in out or "status" in out


def test_tool_names_and_load_tool():
    def adder(q):
        return q

    assert tool_name(SimpleCalculatorTool()) == "SimpleCalculatorTool"
    assert tool_name(adder) == "adder"
    with pytest.raises(ValueError, match="dict"):
        tool_name(lambda q: q)
    with pytest.raises(ValueError, match="SimpleCalculatorTool\\(\\)"):
        tool_name(SimpleCalculatorTool)
    try:
        from transformers import load_tool as _  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="local tool"):
            load_tool("ybelkada/simple-calculator")
