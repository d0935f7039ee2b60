"""The API reference (mkdocs.yml, docs/) builds with warnings as errors and covers the package:
every name in ``rljax.__all__`` has an entry where it is defined, every module file has a page
section, and the README's porting table and list of differences from TRL are in it.

One ``mkdocs build --strict`` (about 15 s) is shared by the tests; it is skipped where the
``docs`` packages are not installed (they are in the ``test`` extra)."""
from __future__ import annotations

import html
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _text(page: pathlib.Path) -> str:
    """A built page's visible text, whitespace collapsed."""
    raw = page.read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def _plain(markdown: str) -> str:
    """Markdown inline text as the page shows it (code marks and emphasis dropped)."""
    parts = markdown.split("`")  # odd parts are code spans: kept verbatim
    prose = [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", p).replace("**", " ") for p in parts[::2]]
    parts[::2] = prose
    return " ".join(" ".join(parts).split())


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end != -1 else None]
    return "\n".join(line for line in section.splitlines() if "--8<--" not in line)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def anchors(site) -> set[str]:
    ids: set[str] = set()
    for page in site.rglob("*.html"):
        ids.update(re.findall(r'id="(rljax[\w.]*)"', page.read_text(encoding="utf-8")))
    return ids


def test_every_public_name_has_an_entry_where_it_is_defined(anchors):
    import rljax

    missing = []
    for name in rljax.__all__:
        module = getattr(getattr(rljax, name), "__module__", None) or rljax._LAZY[name]
        if f"{module}.{name}" not in anchors:
            missing.append(f"{module}.{name}")
    assert not missing, f"public names without a reference entry: {missing}"


def test_every_module_and_the_issue_s_api_list_are_documented(anchors):
    expected = {"rljax.core", "rljax.losses", "rljax.ppo", "rljax.ppo_train", "rljax.generation",
                "rljax.sharding", "rljax.checkpoint", "rljax.cli", "rljax.trainers.ppo",
                "rljax.trainers.sft", "rljax.trainers.dpo", "rljax.models.hub", "rljax.models.auto"}
    for path in (ROOT / "rljax").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(p.startswith("_") for p in parts[1:]) or "sys.modules[__name__]" in path.read_text(encoding="utf-8"):
            continue  # private modules, __init__/__main__, and old import paths aliasing another module
        expected.add(".".join(parts))
    assert not sorted(expected - anchors), f"modules missing from the reference: {sorted(expected - anchors)}"


def test_porting_table_and_differences_from_trl_are_in_the_reference(site):
    page = _text(site / "porting" / "index.html")
    section = _readme_section("Porting from TRL")
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    bullets = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    assert len(rows) > 10 and len(bullets) > 10
    for line in rows:
        for cell in line.strip("|").split(" | "):
            assert _plain(cell) in page, f"porting table cell missing from the reference: {cell!r}"
    for bullet in bullets:
        assert _plain(bullet) in page, f"difference from TRL missing from the reference: {bullet!r}"


def test_sharding_failure_install_and_cli_pages_carry_the_readme_text(site):
    for title, page in [("Sharding and multi-host", "sharding"), ("Failure behaviour", "failure"),
                        ("Install", "install"), ("Command line, scripts, notebooks", "cli")]:
        first = next(p for p in _readme_section(title).split("\n\n")[1:]
                     if p.strip() and not p.lstrip().startswith(("```", "|")))
        assert _plain(first) in _text(site / page / "index.html"), (title, first[:80])
