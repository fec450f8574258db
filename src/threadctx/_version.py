"""The installed distribution's version, for ``threadctx.__version__`` and the metrics' meter.

The bottom layer: no module needs to import the package ``__init__`` for it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("threadctx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
