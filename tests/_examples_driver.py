"""Runs several example scripts one after another in ONE Python process, each as ``__main__``
(``runpy.run_path``) with its own argv, working directory and log file: tests/test_examples.py
pays one Python + JAX + transformers start-up instead of one per script.

    python tests/_examples_driver.py PLAN.json RESULTS.json

PLAN.json: ``[{"name", "argv": [script, *args] or ["-c", code], "cwd"}, ...]``. For each run,
file descriptors 1 and 2 go to ``cwd/output.log``; the exit code is what the script's
``SystemExit`` carried (0 when it returned normally, 1 after any other exception, whose
traceback is logged). RESULTS.json: ``{name: exit code}``, rewritten after every run.

Between runs the ``rljax`` modules and those imported from the working tree's ``experiments/``
are dropped from ``sys.modules`` (import-time state such as ``PPOConfig.exp_name``, TRL's
``sys.argv[0]`` default, is then the running script's); jax, transformers and the rest stay.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def run_one(argv: list, cwd: str) -> int:
    """Run ``argv`` (a script path and its arguments, or ``["-c", code]``) as ``__main__`` in ``cwd``."""
    os.chdir(cwd)
    saved_argv, saved_path = sys.argv, list(sys.path)
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  (reported through the log and the exit code)
        traceback.print_exc()
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forget_project_modules() -> None:
    """Drop ``rljax*`` and ``experiments/`` modules so the next script imports them afresh."""
    experiments = os.path.join(ROOT, "experiments") + os.sep
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name == "rljax" or name.startswith("rljax.") or os.path.abspath(path).startswith(experiments):
            del sys.modules[name]


def main(plan_path: str, results_path: str) -> None:
    results_path = os.path.abspath(results_path)  # the runs change the working directory
    with open(plan_path) as f:
        plan = json.load(f)
    results = {}
    out_fd, err_fd = os.dup(1), os.dup(2)
    for run in plan:
        with open(os.path.join(run["cwd"], "output.log"), "w") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                code = run_one(run["argv"], run["cwd"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(out_fd, 1)
                os.dup2(err_fd, 2)
        forget_project_modules()
        results[run["name"]] = code
        print(f"[examples_driver] {run['name']}: exit {code}", flush=True)
        with open(results_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
