"""The package's one table of public names agrees with its imports, __all__, dir() and lazy loading.

And every public name of every public module is in the API reference.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import threadctx

INIT = Path(threadctx.__file__)
REFERENCE = INIT.parents[2] / "docs" / "reference.md"
#: A documented object: an autodoc directive (which renders its docstring) or a py: one.
DIRECTIVE = re.compile(r"^\.\. (?:auto|py:)\w+:: (threadctx(?:\.\w+)*)$", re.M)


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


def _all_of(path: Path, module: str) -> list[str]:
    """The module's ``__all__``, from its source when it is a literal, else from the module.

    Reading the source imports no optional framework (Django, Flask, Celery...).
    """
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                break
    return list(importlib.import_module(module).__all__)


def public_modules() -> dict[str, list[str]]:
    """Every public module of the package (no ``_`` in its dotted name), with its ``__all__``."""
    found = {"threadctx": _all_of(INIT, "threadctx")}
    for info in pkgutil.walk_packages(threadctx.__path__, "threadctx."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        spec = importlib.util.find_spec(info.name)
        assert spec is not None, info.name
        assert spec.origin is not None, info.name
        found[info.name] = _all_of(Path(spec.origin), info.name)
    return found


def test_the_public_modules_are_found() -> None:
    """The walk finds the adapters, and nothing private."""
    modules = public_modules()
    assert {"threadctx", "threadctx.wsgi", "threadctx.asgi", "threadctx.celery"} <= set(modules)
    assert not [name for name in modules if "._" in name]
    assert all(modules.values()), "every public module declares __all__"


def test_every_public_name_is_in_the_reference() -> None:
    """Each name of each public module's __all__ has a directive of its own in docs/reference.md."""
    documented = set(DIRECTIVE.findall(REFERENCE.read_text()))
    expected = {
        f"{module}.{name}"
        for module, names in public_modules().items()
        for name in names
        if name != "__version__"
    }
    assert sorted(expected - documented) == []


def test_the_reference_documents_only_public_names() -> None:
    """Nothing on the page is gone from (or was never in) a public __all__: a renamed name goes too."""
    documented = set(DIRECTIVE.findall(REFERENCE.read_text()))
    modules = public_modules()
    public = {f"{module}.{name}" for module, names in modules.items() for name in names} | set(modules)
    # Members of a documented class (Watchdog.stop) are documented by its directive's options.
    assert sorted(documented - public) == []


@pytest.mark.parametrize("module", sorted(public_modules()))
def test_every_public_class_and_function_says_since_when(module: str) -> None:
    """Each documents the version that added it (``.. versionadded::``), as the changelog promises."""
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:  # an adapter whose framework is not installed (the oldest-API job)
        pytest.skip(f"{module} needs {error.name}, not installed here")
    missing = [
        name
        for name in public_modules()[module]
        if callable(obj := getattr(loaded, name)) and "versionadded::" not in (obj.__doc__ or "")
    ]
    assert missing == []
