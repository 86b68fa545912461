"""Every dotted name the docs and the docstrings point to exists: a backticked ``module.name``
(``pipeline.engine.checkpoint.take``, or a module of ours by its file name, ``checkpoint.take``)
resolves to a module, a function, a class or one of their attributes. A function that moves
without its references fails here, not a reader. Config keys (``train.lr``) and file names
(``metrics.jsonl``) are told apart and left out."""
import ast
import dataclasses
import importlib
import re
import typing

import pytest

from pipeline.engine.config import RunConfig
from tests.conftest import REPO

pytestmark = pytest.mark.unit
PACKAGES = ("pipeline", "data_prep", "common", "benchmarks")
SHORT_FORMS = ("pipeline", "data_prep", "common")           # whose modules the text names by file name alone
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "txt", "pt", "safetensors", "bin", "png", "sh", "sbatch",
                 "model", "csv", "toml", "ini"}
SPAN = re.compile(r"``([^`]+)``|`([^`]+)`")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?$")


def _modules() -> dict[str, str]:
    """A module's file name -> its dotted path, for the names only one module of ours has."""
    seen: dict[str, list[str]] = {}
    for package in SHORT_FORMS:
        for path in (REPO / package).rglob("*.py"):
            if path.name != "__init__.py":
                dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
                seen.setdefault(path.stem, []).append(dotted)
    return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


def _is_config_key(parts: list[str]) -> bool:
    section = RunConfig
    for part in parts:
        if not dataclasses.is_dataclass(section) or part not in {f.name for f in dataclasses.fields(section)}:
            return False
        section = typing.get_type_hints(section)[part]
    return True


def _resolves(parts: list[str]) -> bool:
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if dataclasses.is_dataclass(found) and name in {f.name for f in dataclasses.fields(found)}:
                return True            # a field of a typed config or record
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def _texts():
    """(file, text): the Markdown docs whole; of the code, the docstrings and comments."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        yield path, path.read_text()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text()
            nodes = [n for n in ast.walk(ast.parse(source))
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            comments = [line.split("#", 1)[1] for line in source.splitlines() if "#" in line]
            yield path, "\n".join([ast.get_docstring(n) or "" for n in nodes] + comments)


def _references(text: str, modules: dict[str, str]):
    for match in SPAN.finditer(text):
        name = DOTTED.match((match.group(1) or match.group(2)).strip())
        if not name:
            continue
        parts = name.group(1).split(".")
        if parts[-1] in FILE_SUFFIXES or _is_config_key(parts):
            continue
        if parts[0] in PACKAGES:
            yield name.group(1), parts
        elif parts[0] in modules:
            yield name.group(1), modules[parts[0]].split(".") + parts[1:]


def test_every_dotted_reference_in_the_docs_and_docstrings_exists():
    modules = _modules()
    missing, checked = [], 0
    for path, text in _texts():
        for written, parts in _references(text, modules):
            checked += 1
            if not _resolves(parts):
                missing.append(f"{path.relative_to(REPO)}: `{written}` ({'.'.join(parts)})")
    assert checked > 30                  # the scan finds the references it is there for
    assert not missing, "\n".join(missing)


def test_a_reference_to_a_name_that_moved_is_found():
    modules = _modules()
    found = list(_references("see `loop.no_such_function` and ``pipeline.engine.guard.keep_or_poison``; "
                             "`train.lr`, `metrics.jsonl`", modules))
    assert [written for written, _ in found] == ["loop.no_such_function", "pipeline.engine.guard.keep_or_poison"]
    assert not _resolves(found[0][1]) and _resolves(found[1][1])
