"""The package's one table of public names agrees with its imports, __all__, dir() and lazy loading."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import threadctx

INIT = Path(threadctx.__file__)


def _imports() -> tuple[dict[str, str], dict[str, str]]:
    """The ``name as name`` imports of ``__init__.py``: (eager, under TYPE_CHECKING), name -> module."""
    eager: dict[str, str] = {}
    typing_only: dict[str, str] = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            statements, into = node.body, typing_only
        elif isinstance(node, ast.ImportFrom):
            statements, into = [node], eager
        else:
            continue
        for statement in statements:
            assert isinstance(statement, ast.ImportFrom), ast.dump(statement)
            if statement.module is None or not statement.module.startswith("threadctx."):
                continue
            for alias in statement.names:
                assert alias.asname == alias.name, f"{alias.name}: import it as itself (explicit re-export)"
                into[alias.name] = statement.module
    return eager, typing_only


def test_the_imports_are_the_table() -> None:
    """Every name of the table is imported from its module, once: eagerly or for type checkers."""
    eager, typing_only = _imports()
    assert not eager.keys() & typing_only.keys()
    assert {**eager, **typing_only} == threadctx._EXPORTS


def test_all_and_dir_are_the_table() -> None:
    assert sorted(threadctx.__all__) == sorted(threadctx._EXPORTS)
    assert len(set(threadctx.__all__)) == len(threadctx.__all__)
    assert dir(threadctx) == sorted(threadctx._EXPORTS)


def test_each_name_is_its_modules() -> None:
    for name, module in threadctx._EXPORTS.items():
        assert getattr(threadctx, name) is getattr(importlib.import_module(module), name), name


def test_import_loads_only_the_eager_modules() -> None:
    """``import threadctx`` leaves the modules of the lazy names unloaded, and loads each on first use."""
    eager, typing_only = _imports()
    lazy_modules = sorted(set(typing_only.values()) - set(eager.values()))
    name = next(name for name, module in typing_only.items() if module == "threadctx._filter")
    code = (
        "import sys, threadctx\n"
        f"print(sorted(m for m in {lazy_modules!r} if m in sys.modules))\n"
        f"threadctx.{name}\n"
        "print('threadctx._filter' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "True"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        threadctx.no_such_name  # type: ignore[attr-defined]  # noqa: B018
