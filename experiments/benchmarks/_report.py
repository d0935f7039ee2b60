"""What every benchmark script does with its markdown: print it, and write it to ``--out`` when
given (run_all.py reads that file into RESULTS.md)."""
from __future__ import annotations

from typing import Optional, Sequence


def emit(lines: Sequence[str], out: Optional[str]) -> str:
    """Print ``lines`` as one markdown text and write it to ``out`` (if set); returns the text."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    return text
