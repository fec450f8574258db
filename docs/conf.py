"""Sphinx configuration: MyST pages, the API reference from docstrings, warnings are errors (-W)."""

from __future__ import annotations

import os
from importlib import metadata

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
