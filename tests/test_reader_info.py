"""reader_info(): which reader shows other threads' contexts and why, for every reason it can give.

Each reason is forced the way it happens to a user: an environment variable, a module that is not
installed, one that fails to load or reads wrong (a stand-in ``threadctx._ctxread`` put in
``sys.modules`` of a fresh interpreter before threadctx is imported), an interpreter the reader
was not checked against (``load()``'s keywords, as the build hook's ceiling is the same constant).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path
from types import ModuleType

import pytest

import threadctx
from threadctx import _current, _reader

ROOT = Path(__file__).resolve().parent.parent
BUILT = _current.LOADED_READER is not None
NOT_BUILT_REASON = (
    "threadctx._ctxread is not built here (no compiler, free-threaded, or THREADCTX_PURE_PYTHON)"
)

# Run in a fresh interpreter: PRELUDE (which may plant a stand-in module), then import threadctx and
# print what reader_info() says and whether snapshot() reads through the compiled reader.
SCRIPT = """
import json, sys, warnings
warnings.simplefilter("always")
{prelude}
with warnings.catch_warnings(record=True) as caught:
    import threadctx
    from threadctx import _current
info = threadctx.reader_info()
print(json.dumps({{
    "name": info.name, "reason": info.reason, "detail": info.detail,
    "in_use": _current.reader_in_use(),
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    "header": threadctx.dump(frames=0).splitlines()[1],
}}))
"""


def fresh(prelude: str = "", **env: str) -> dict[str, object]:
    """What a fresh interpreter's threadctx says about its reader."""
    environ = {k: v for k, v in os.environ.items() if k != "THREADCTX_PURE_PYTHON"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(prelude=textwrap.dedent(prelude))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    assert result["header"] == f"reader: {result['name']} ({result['reason']}): {result['detail']}"
    return result


def test_reader_info_is_a_frozen_value_that_says_itself_in_one_line() -> None:
    info = threadctx.reader_info()
    assert isinstance(info, threadctx.ReaderInfo)
    assert info.name in ("compiled", "mirror")
    assert info.reason in ("built", "not-built", "refused", "disabled", "failed")
    assert (info.name == "compiled") == (info.reason == "built")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "mirror"  # type: ignore[misc]
    assert str(info) == f"{info.name} ({info.reason}): {info.detail}"
    assert threadctx.dump(frames=0).splitlines()[1] == f"reader: {info}"


def test_built_the_compiled_reader_is_in_use_and_says_so() -> None:
    if not BUILT:
        pytest.skip(NOT_BUILT_REASON)
    seen = fresh()
    assert (seen["name"], seen["reason"], seen["in_use"]) == ("compiled", "built", True)
    assert seen["warnings"] == []


def test_the_real_reader_passes_its_self_test_from_any_thread() -> None:
    if _current.LOADED_READER is None:
        pytest.skip(NOT_BUILT_REASON)
    assert _reader._self_test(_current.LOADED_READER) is None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(_reader._self_test, _current.LOADED_READER).result() is None


@pytest.mark.parametrize("value", ["1", "yes"])
def test_disabled_by_the_environment_variable(value: str) -> None:
    seen = fresh(THREADCTX_PURE_PYTHON=value)
    assert (seen["name"], seen["reason"], seen["in_use"]) == ("mirror", "disabled", False)
    assert seen["detail"] == f"THREADCTX_PURE_PYTHON={value}"
    assert seen["warnings"] == []


def test_zero_does_not_disable_it() -> None:
    seen = fresh(THREADCTX_PURE_PYTHON="0")
    assert seen["reason"] != "disabled"


def test_not_built_when_the_module_is_not_installed() -> None:
    # None in sys.modules: the import system reports the module as not found, as without the file.
    seen = fresh('sys.modules["threadctx._ctxread"] = None')
    assert (seen["name"], seen["reason"], seen["in_use"]) == ("mirror", "not-built", False)
    assert "no C compiler" in str(seen["detail"])
    assert seen["warnings"] == []


def test_failed_when_the_module_is_there_but_does_not_load() -> None:
    prelude = """
    import importlib.abc

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "threadctx._ctxread":
                raise ImportError("undefined symbol: PyThreadState_Next")
            return None

    sys.meta_path.insert(0, Broken())
    """
    seen = fresh(prelude)
    assert (seen["name"], seen["reason"], seen["in_use"]) == ("mirror", "failed", False)
    assert "could not be loaded (undefined symbol: PyThreadState_Next)" in str(seen["detail"])
    assert [category for category, _ in seen["warnings"]] == ["RuntimeWarning"]  # type: ignore[attr-defined]


# Stand-ins for a reader that reads a PyThreadState whose fields changed meaning: each is wrong in
# one way that the self-test must catch.
WRONG_READERS = {
    "sees-nothing": "lambda var: {}",
    "raises": "lambda var: 1 / 0",
    "wrong-thread": "lambda var: {threading.get_ident() + 1: (threading.get_native_id(), var.get(None))}",
    "stale-context": "lambda var: {threading.get_ident(): (native, var.get(None) or object())}",
    "wrong-native-id": "lambda v: {threading.get_ident(): (native + 1, v.get())} if v.get(None) else {}",
}


@pytest.mark.parametrize("contexts", WRONG_READERS.values(), ids=WRONG_READERS.keys())
def test_failed_self_test_falls_back_to_the_mirror_with_a_warning(contexts: str) -> None:
    prelude = f"""
    import threading, types
    native = threading.get_native_id() if sys.version_info >= (3, 11) else 0
    fake = types.ModuleType("threadctx._ctxread")
    fake.contexts = {contexts}
    sys.modules["threadctx._ctxread"] = fake
    """
    seen = fresh(prelude)
    assert (seen["name"], seen["reason"], seen["in_use"]) == ("mirror", "failed", False)
    assert "failed its self-test" in str(seen["detail"])
    [(category, message)] = seen["warnings"]  # type: ignore[misc]
    assert category == "RuntimeWarning"
    assert "use the pure-Python mirror" in message


def test_a_stand_in_that_reads_right_passes() -> None:
    """The self-test is not simply failing everything that is not the real module."""
    prelude = """
    import threading, types
    native = threading.get_native_id() if sys.version_info >= (3, 11) else 0
    fake = types.ModuleType("threadctx._ctxread")
    fake.contexts = lambda var: {threading.get_ident(): (native, var.get())} if var.get(None) else {}
    sys.modules["threadctx._ctxread"] = fake
    """
    seen = fresh(prelude)
    assert (seen["name"], seen["reason"]) == ("compiled", "built")


def test_refused_beyond_the_version_it_was_checked_against() -> None:
    major, minor = _reader.CHECKED_UP_TO
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal is not a failure: no warning
        reader, info = _reader.load(environ={}, version=(major, minor + 1))
    assert reader is None
    assert (info.name, info.reason) == ("mirror", "refused")
    assert f"Python {major}.{minor + 1} is newer than" in info.detail
    assert f"({major}.{minor})" in info.detail
    if BUILT:
        reader, info = _reader.load(environ={}, version=(major, minor))
        assert (info.name, info.reason) == ("compiled", "built")
        assert reader is not None


@pytest.mark.parametrize(
    ("keywords", "words"),
    [
        ({"free_threaded": True}, "free-threaded"),
        ({"implementation": "pypy"}, "pypy is not CPython"),
    ],
)
def test_refused_on_interpreters_it_must_not_read(keywords: dict[str, object], words: str) -> None:
    reader, info = _reader.load(environ={}, **keywords)  # type: ignore[arg-type]
    assert reader is None
    assert info.reason == "refused"
    assert words in info.detail


def test_disabled_wins_over_refused() -> None:
    _, info = _reader.load(environ={"THREADCTX_PURE_PYTHON": "1"}, free_threaded=True)
    assert info.reason == "disabled"


def _hatch_build() -> ModuleType:
    pytest.importorskip("hatchling", reason="hatchling (the build backend, test group) runs the build hook")
    spec = importlib.util.spec_from_file_location("hatch_build", ROOT / "hatch_build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_hook_reads_the_same_ceiling_and_refuses_beyond_it() -> None:
    hook = _hatch_build()
    assert hook.checked_up_to(ROOT) == _reader.CHECKED_UP_TO
    major, minor = _reader.CHECKED_UP_TO
    assert hook._skip_reason(ROOT, (major, minor)) is None or sysconfig.get_config_var("Py_GIL_DISABLED")
    reason = hook._skip_reason(ROOT, (major, minor + 1))
    assert reason is not None
    assert f"newer than the newest release the reader was checked against ({major}.{minor}" in reason


_RUN_THE_OLD_READER = """
import contextvars, importlib.util, sys
spec = importlib.util.spec_from_file_location("_ctxread", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
var = contextvars.ContextVar("var")
var.set("value")
print("loaded", flush=True)
sys.stdin.readline()  # the file is replaced meanwhile; contexts() has not run yet: its pages load now
print(module.contexts(var)[__import__("threading").get_ident()][1], flush=True)
"""


@pytest.mark.skipif(_current.LOADED_READER is None, reason="threadctx._ctxread is not built here")
@pytest.mark.skipif(sys.platform == "win32", reason="Windows refuses to replace a loaded DLL at all")
def test_an_editable_rebuild_leaves_processes_running_the_old_reader_alive(tmp_path: Path) -> None:
    """``pip install -e .`` again (make's venv targets) while a test run or a service has the module loaded.

    The hook used to copy the new module into the loaded file: the running process crashed with
    SIGBUS the next time it touched the module's pages (a "segfault in garbage collection").
    """
    hook = _hatch_build()
    import threadctx._ctxread as compiled  # type: ignore[import-not-found,unused-ignore]

    target = tmp_path / Path(compiled.__file__).name
    target.write_bytes(Path(compiled.__file__).read_bytes())
    with subprocess.Popen(
        [sys.executable, "-c", _RUN_THE_OLD_READER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        assert process.stdout.readline() == "loaded\n"
        rebuilt = tmp_path / "rebuilt"
        rebuilt.write_bytes(b"another build, shorter than the loaded one")
        hook._replace_file(rebuilt, target)
        output, _ = process.communicate("\n", timeout=60)
    assert process.returncode == 0, f"the process running the old module died ({process.returncode})"
    assert output == "value\n"
    assert target.read_bytes() == rebuilt.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([target.name, "rebuilt"])


@pytest.mark.skipif(sysconfig.get_platform().startswith("win"), reason="the failing compiler is set with CC")
@pytest.mark.timeout(600)  # a wheel build in a fresh build environment
def test_a_strict_build_fails_instead_of_falling_back(tmp_path: Path) -> None:
    """THREADCTX_STRICT_BUILD=1 (make test, CI, release wheels): a reader that fails to compile fails."""
    env = {k: v for k, v in os.environ.items() if k != "THREADCTX_BUILD_EXTENSION"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "CC": "/bin/false", "THREADCTX_STRICT_BUILD": "1"},
        check=False,
    )
    if done.returncode != 0 and "No matching distribution found" in done.stderr:
        pytest.skip("pip cannot fetch the build backend (hatchling, setuptools) here")
    assert done.returncode != 0
    assert "THREADCTX_STRICT_BUILD is set and threadctx._ctxread did not compile cleanly" in done.stderr
    assert list(tmp_path.glob("*.whl")) == []
