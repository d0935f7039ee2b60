"""mkdocs hook: module lists that follow the source tree.

A page line ``<!-- rljax:modules PACKAGE -->`` becomes one ``::: PACKAGE.module`` entry per
module file of that package (``_private`` files, ``__main__`` and old-path aliases skipped), so a
new trainer or model family shows up in the reference without editing it. The line
``<!-- rljax:modules rljax rest -->`` becomes an entry for every flat ``rljax/*.py`` module and
every sub-package that no page documents, so nothing public is left out. ``<!-- rljax:optional rljax.a rljax.b -->`` lists modules
that are planned or optional: an entry for each one that exists, nothing for the rest. ``<!-- rljax:public-names -->`` becomes one table row per name in
``rljax.__all__``, linked to its entry (a name without one is a broken reference, which fails
``mkdocs build --strict``).
"""
from __future__ import annotations

import importlib
import pathlib
import re

_DIRECTIVE = re.compile(r"^<!-- rljax:modules (\S+)( rest)? -->$", re.M)
_OPTIONAL = re.compile(r"^<!-- rljax:optional (.+) -->$", re.M)
_ENTRY = re.compile(r"^::: (\S+)", re.M)
_SUBMODULES = "\n    options:\n      show_submodules: true"


def _is_alias(path: pathlib.Path) -> bool:
    """An old import path that replaces itself with another module (documented there)."""
    return "sys.modules[__name__]" in path.read_text(encoding="utf-8")


def _modules(package: str) -> list[str]:
    """Dotted names of the module files (not sub-packages) directly in `package`."""
    root = pathlib.Path(*package.split("."))
    return [f"{package}.{p.stem}" for p in sorted(root.glob("*.py"))
            if not p.stem.startswith("_") and not _is_alias(p)]


def _exists(module: str) -> bool:
    path = pathlib.Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _present(names: str) -> list[str]:
    return [m for m in names.split() if _exists(m)]


def _entry(name: str) -> str:
    """A mkdocstrings entry; a package's entry also renders its modules."""
    return f"::: {name}" + (_SUBMODULES if pathlib.Path(*name.split(".")).is_dir() else "")


def _subpackages(package: str) -> list[str]:
    root = pathlib.Path(*package.split("."))
    return [f"{package}.{p.parent.name}" for p in sorted(root.glob("*/__init__.py"))
            if not p.parent.name.startswith("_")]


def _documented(files) -> set[str]:
    """Every module some page documents, explicitly or through a package directive."""
    names: set[str] = set()
    for page in files.documentation_pages():
        text = pathlib.Path(page.abs_src_path).read_text(encoding="utf-8")
        names.update(_ENTRY.findall(text))
        for listed in _OPTIONAL.findall(text):
            names.update(_present(listed))
        for package, rest in _DIRECTIVE.findall(text):
            if not rest:
                names.add(package)
                names.update(_modules(package))
    return names


def _public_rows() -> str:
    """`| [name][module.name] | module |` for every name `rljax` exports."""
    rljax = importlib.import_module("rljax")
    rows = []
    for name in rljax.__all__:
        module = getattr(getattr(rljax, name), "__module__", None) or rljax._LAZY[name]
        rows.append(f"| [`{name}`][{module}.{name}] | `{module}` |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if "<!-- rljax:public-names -->" in markdown:
        markdown = markdown.replace("<!-- rljax:public-names -->", _public_rows())

    def expand(match: re.Match) -> str:
        package, rest = match.group(1), match.group(2)
        if rest:
            done = _documented(files)
            names = [m for m in _modules(package) + _subpackages(package) if m not in done]
        else:
            names = _modules(package)
        return "\n\n".join(_entry(name) for name in names) or "(none)"

    markdown = _OPTIONAL.sub(lambda m: "\n\n".join(_entry(n) for n in _present(m.group(1))), markdown)
    return _DIRECTIVE.sub(expand, markdown)
