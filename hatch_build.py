"""Build hook: compiles threadctx's optional C reader (``threadctx._ctxread``) into the wheel.

The reader lets ``snapshot()`` read each thread's current context itself (see
docs/concepts.md, "How snapshot() reads other threads"). It is optional: when
it cannot be built (no compiler, no Python headers, a free-threaded build, not
CPython, or ``THREADCTX_BUILD_EXTENSION=0``) the hook says why and the wheel is the
pure-Python one, which threadctx runs on with its registry mirror. The build
never fails because of it.

It reads fields of CPython's ``PyThreadState``, so it is built only for the
CPython releases it was checked against: up to ``CHECKED_UP_TO``, read from
``src/threadctx/_reader.py`` (which refuses a newer one at run time too). Raise
that constant once a new release's ``Include/cpython/pystate.h`` has been read.

``THREADCTX_STRICT_BUILD=1`` (set by the Makefile) compiles with warnings as
errors, and a failed compile then fails the build instead of falling back.

An editable install (``pip install -e .``) puts the module beside the sources
in ``src/threadctx/``, where the editable import finds it; a regular wheel gets
it from a temporary directory, and is then tagged for this interpreter and
platform.
"""

from __future__ import annotations

import ast
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "threadctx._ctxread"
SOURCE = "src/threadctx/_ctxread.c"
READER = "src/threadctx/_reader.py"
STRICT_ENV = "THREADCTX_STRICT_BUILD"


def checked_up_to(root: Path) -> tuple[int, int]:
    """``CHECKED_UP_TO`` from the package's ``_reader.py``, read without importing the package."""
    tree = ast.parse((root / READER).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "CHECKED_UP_TO"
        ]:
            major, minor = ast.literal_eval(node.value)
            return int(major), int(minor)
    raise RuntimeError(f"no CHECKED_UP_TO in {READER}")


def _skip_reason(root: Path, version: tuple[int, int] | None = None) -> str | None:
    """Why the reader is not built for this interpreter (``version``: another one's), or None."""
    if os.environ.get("THREADCTX_BUILD_EXTENSION", "1") == "0":
        return "THREADCTX_BUILD_EXTENSION=0"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} (the reader reads CPython's thread states)"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "a free-threaded build (the reader relies on the GIL)"
    newest = checked_up_to(root)
    major, minor = version if version is not None else (sys.version_info[0], sys.version_info[1])
    if (major, minor) > newest:
        return (
            f"Python {major}.{minor} is newer than the newest release the reader "
            f"was checked against ({newest[0]}.{newest[1]}: CHECKED_UP_TO in {READER})"
        )
    return None


def _compile(root: Path, work: Path, strict: bool) -> Path:
    """Compile the module with the platform's compiler (through setuptools) and return its path."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    if sysconfig.get_platform().startswith("win"):
        flags = []  # MSVC: its defaults (warnings as errors are checked with GCC and Clang)
    else:
        flags = ["-Wall", "-Wextra", "-O2", *(["-Werror"] if strict else [])]
    extension = Extension(MODULE, [str(root / SOURCE)], extra_compile_args=flags)
    command = build_ext(Distribution({"name": "threadctx", "ext_modules": [extension]}))
    command.build_lib = str(work / "lib")
    command.build_temp = str(work / "temp")
    command.ensure_finalized()
    command.run()
    return Path(command.get_ext_fullpath(MODULE))


def _replace_file(source: Path, target: Path) -> None:
    """Put a copy of ``source`` at ``target`` by renaming a new file over it, never writing into it.

    A process that has loaded the old module (a test run, a service running from the tree) keeps
    the old file mapped: writing into it in place makes that process crash (SIGBUS or SIGSEGV) the
    next time it touches one of its pages.
    """
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


class CtxReadBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds the compiled reader to the wheel, or leaves the wheel pure Python."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile the reader before hatchling collects the wheel's files."""
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        reason = _skip_reason(root)
        if reason is not None:
            self.app.display_warning(f"threadctx: not building {MODULE}: {reason}; pure-Python wheel")
            return
        strict = os.environ.get(STRICT_ENV, "") not in ("", "0")
        self._work = Path(tempfile.mkdtemp(prefix="threadctx-build-"))
        try:
            built = _compile(root, self._work, strict)
        except (Exception, SystemExit) as exc:  # any failure, distutils's SystemExit included
            if strict:
                raise RuntimeError(f"{STRICT_ENV} is set and {MODULE} did not compile cleanly") from exc
            self.app.display_warning(
                f"threadctx: could not build {MODULE} ({type(exc).__name__}: {exc}); "
                "pure-Python wheel, snapshot() uses the registry mirror"
            )
            return
        if version == "editable":
            # The editable wheel points the import system at src/: put the module there.
            _replace_file(built, root / "src" / "threadctx" / built.name)
        else:
            build_data["force_include"][str(built)] = f"threadctx/{built.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """Remove the temporary build directory once the wheel is written."""
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
