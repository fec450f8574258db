"""What import-linter cannot see: no module borrows another module's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

import threadctx

PACKAGE = Path(threadctx.__file__).parent


def test_no_module_imports_another_modules_private_names() -> None:
    """A name shared between modules has no leading underscore (``from threadctx import _x`` is a module)."""
    borrowed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("threadctx")):
                continue
            for alias in node.names:
                submodule = PACKAGE.joinpath(*(node.module or "").split(".")[1:], alias.name)
                is_module = submodule.with_suffix(".py").exists() or submodule.is_dir()
                if alias.name.startswith("_") and not alias.name.startswith("__") and not is_module:
                    borrowed.append(f"{path.relative_to(PACKAGE)}: from {node.module} import {alias.name}")
    assert borrowed == []
