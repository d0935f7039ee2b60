"""Run every benchmark script in experiments/benchmarks/ and update RESULTS.md. Not a test.

    python experiments/benchmarks/run_all.py [--quick] [--only bench_models bench_ppo]
        [--threads 2] [--timeout 3600] [--results experiments/benchmarks/RESULTS.md] [--dry_run]

Each ``bench_*.py`` present is run in its own process (``sys.executable``, repository root as
working directory), one after another so they do not compete for the CPU. ``--quick`` maps to
each script's own short mode (below); scripts not listed there get ``--quick`` when their
``--help`` offers it. A script's markdown table (its ``--out`` file when it has that flag, else
its stdout) replaces that script's section of RESULTS.md (between ``<!-- BEGIN name -->`` /
``<!-- END name -->`` markers), under a line saying when, how (quick or full, arguments) and in
how long it ran. Sections of scripts that were not run are kept. A script that fails leaves its
previous table in place with a note of the failure; run_all exits non-zero if any failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_RESULTS = os.path.join(HERE, "RESULTS.md")


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to run one script: extra arguments for a quick / full run."""

    quick: Tuple[str, ...] = ()
    full: Tuple[str, ...] = ()
    note: str = ""


# Short modes of the scripts we know (read from their argparse definitions).
KNOWN: Dict[str, Spec] = {
    "bench_ddpo.py": Spec(quick=("--quick",),
                          note="needs the TRL 0.7.11 venv with diffusers/peft: bash experiments/benchmarks/trl_env.sh"),
    "bench_models.py": Spec(quick=("--quick",)),
    "bench_ppo.py": Spec(quick=("--models", "tiny", "--iters", "1"),
                         note="needs the TRL 0.7.11 venv: bash experiments/benchmarks/trl_env.sh"),
    "bench_sharding.py": Spec(quick=("--steps", "5", "--ckpt_layers", "1")),
}

HEADER = """# Benchmark results

Written by `python experiments/benchmarks/run_all.py` (each section is replaced when its script runs
again; `--quick` runs are marked). Numbers come from whatever machine ran them: compare rows of one
section, not numbers across machines.
"""


def discover(only: Optional[Sequence[str]] = None) -> List[str]:
    names = sorted(n for n in os.listdir(HERE) if re.fullmatch(r"bench_\w+\.py", n))
    if only:
        wanted = {o if o.endswith(".py") else f"{o}.py" for o in only}
        missing = sorted(wanted - set(names))
        if missing:
            raise SystemExit(f"No such benchmark script(s) {missing}; present: {names}.")
        names = [n for n in names if n in wanted]
    return names


def script_help(path: str, timeout: float = 300) -> str:
    try:
        r = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        return r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return ""


def command_for(name: str, quick: bool, threads: Optional[int], help_text: str, out_file: Optional[str]) -> List[str]:
    spec = KNOWN.get(name)
    args: List[str] = []
    if spec is not None:
        args += list(spec.quick if quick else spec.full)
    elif quick and "--quick" in help_text:
        args.append("--quick")
    if threads is not None and "--threads" in help_text:
        args += ["--threads", str(threads)]
    if out_file is not None:
        args += ["--out", out_file]
    return [sys.executable, os.path.join(HERE, name), *args]


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    table: str
    command: List[str]
    error: str = ""


def run_one(name: str, quick: bool, threads: Optional[int], timeout: float, dry_run: bool) -> Optional[Outcome]:
    path = os.path.join(HERE, name)
    help_text = script_help(path)
    use_out = "--out" in help_text
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "table.md") if use_out else None
        cmd = command_for(name, quick, threads, help_text, out_file)
        shown = [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd if c != out_file and c != sys.executable]
        shown = [s for i, s in enumerate(shown) if not (s == "--out" and i == len(shown) - 1)]
        print(f"[run_all] {name}: python {' '.join(shown)}", flush=True)
        if dry_run:
            return None
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            rc, stdout, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = -1, e.stdout or "", f"timed out after {timeout:.0f}s"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        seconds = time.time() - t0
        table = ""
        if use_out and os.path.exists(out_file):
            with open(out_file) as f:
                table = f.read()
        if not table.strip():
            table = stdout
        if rc != 0:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-8:])
            print(f"[run_all] {name} FAILED (exit {rc}) after {seconds:.0f}s:\n{tail}", flush=True)
            return Outcome(name, False, seconds, table, shown, error=f"exit {rc}: {tail}")
        print(f"[run_all] {name} done in {seconds:.0f}s", flush=True)
        return Outcome(name, True, seconds, table.strip() + "\n", shown)


# --------------------------------------------------------------------------
# RESULTS.md sections
# --------------------------------------------------------------------------


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def read_sections(text: str) -> Dict[str, str]:
    out = {}
    for m in re.finditer(r"<!-- BEGIN (\S+) -->\n(.*?)<!-- END \1 -->", text, flags=re.S):
        out[m.group(1)] = m.group(2)
    return out


def render_section(outcome: Outcome, quick: bool, previous: Optional[str]) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    mode = "quick" if quick else "full"
    head = f"## {outcome.name}\n\n"
    if outcome.ok:
        meta = (f"_{when}, {mode} run (`python {' '.join(outcome.command)}`), {outcome.seconds:.0f} s, "
                f"{platform.machine()} / {os.cpu_count()} CPUs, Python {platform.python_version()}._\n\n")
        return head + meta + outcome.table
    note = f"_{when}: the {mode} run failed ({outcome.error.splitlines()[0] if outcome.error else 'error'})._\n\n"
    if previous:
        body = re.sub(r"^## .*?\n\n", "", previous, count=1, flags=re.S)
        body = re.sub(r"^_[^\n]*failed[^\n]*_\n\n", "", body)
        return head + note + body
    detail = "```\n" + outcome.error + "\n```\n"
    return head + note + detail


def update_results(path: str, outcomes: Sequence[Outcome], quick: bool) -> None:
    text = open(path).read() if os.path.exists(path) else HEADER
    sections = read_sections(text)
    for o in outcomes:
        begin, end = _markers(o.name)
        block = f"{begin}\n{render_section(o, quick, sections.get(o.name))}{end}"
        if o.name in sections:
            text = re.sub(re.escape(begin) + r"\n.*?" + re.escape(end), lambda _: block, text, count=1, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="each script's short mode (minutes instead of tens of minutes)")
    p.add_argument("--only", nargs="+", default=None, help="run only these scripts (e.g. bench_models bench_ppo)")
    p.add_argument("--threads", type=int, default=None, help="passed to the scripts that take --threads")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script before it is stopped")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="markdown file to update (default: RESULTS.md here)")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)

    names = discover(args.only)
    print(f"[run_all] {len(names)} benchmark script(s): {', '.join(names)}", flush=True)
    outcomes = []
    for name in names:
        outcome = run_one(name, args.quick, args.threads, args.timeout, args.dry_run)
        if outcome is not None:
            outcomes.append(outcome)
            update_results(args.results, [outcome], args.quick)  # after each script: a crash keeps earlier results
    if args.dry_run:
        return 0
    failed = [o.name for o in outcomes if not o.ok]
    for name in failed:
        if KNOWN.get(name) and KNOWN[name].note:
            print(f"[run_all] note for {name}: {KNOWN[name].note}")
    where = os.path.abspath(args.results)
    where = os.path.relpath(where, ROOT) if where.startswith(ROOT + os.sep) else where
    print(f"[run_all] {len(outcomes) - len(failed)} ok, {len(failed)} failed; results in {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
