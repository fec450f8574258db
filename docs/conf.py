"""Sphinx configuration: MyST pages, the API reference from docstrings, warnings are errors (-W)."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from sphinx.pycode import ModuleAnalyzer

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

project = "threadctx"
author = "threadctx developers"
copyright = "2026, threadctx developers"
release = metadata.version("threadctx")
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"threadctx {release}"


def _attribute_doc(  # noqa: PLR0917 - the signature of Sphinx's autodoc-process-docstring event
    app: Any, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    """A constant re-exported by ``threadctx`` gets the docstring written beside it in its own module.

    autodoc reads attribute docstrings from the source of the module named in the directive, and
    would show ``int``'s or ``dict``'s own docstring instead.
    """
    import threadctx

    module_name, _, attribute = name.rpartition(".")
    if what != "data" or module_name != "threadctx":
        return
    analyzer = ModuleAnalyzer.for_module(threadctx._EXPORTS[attribute])
    doc = analyzer.find_attr_docs().get(("", attribute))
    if doc is None:
        raise ValueError(f"{name} has no docstring in {threadctx._EXPORTS[attribute]}")
    lines[:] = list(doc)


def setup(app: Any) -> None:
    """Sphinx extension hook: the project's own autodoc adjustment."""
    app.connect("autodoc-process-docstring", _attribute_doc)
