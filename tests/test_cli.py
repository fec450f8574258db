"""``python -m threadctx dump PID`` against a real second process, and the files it exchanges with it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import threadctx
from _helpers import JOIN
from threadctx._ops import exchange

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1") or not hasattr(os, "getuid"), reason="needs SIGUSR1 and user ids"
)

TARGET = textwrap.dedent(
    """
    import os, signal, sys, threading
    from opentelemetry.sdk.trace import TracerProvider
    import threadctx

    how = sys.argv[1]
    if how == "installed":
        threadctx.install_dump_signal()
    elif how == "other handler":
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    release, inside = threading.Event(), threading.Event()

    def charge_card():
        with TracerProvider().get_tracer("t").start_as_current_span("charge"):
            with threadctx.bound(request_id="req-cli"):
                inside.set()
                release.wait(60)

    worker = threading.Thread(target=charge_card, name="worker-1")
    worker.start()
    inside.wait(60)
    print("ready", flush=True)
    sys.stdin.readline()
    release.set()
    worker.join()
    print("bye", flush=True)
    """
)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime directory for this test, seen by this process and the ones it starts."""
    directory = tmp_path / "run"
    monkeypatch.setenv(exchange.RUNTIME_DIR_ENV, str(directory))
    monkeypatch.setenv("OTEL_PYTHON_CONTEXT", "threadctx")
    return directory


class Target:
    """A second Python process that installed the dump signal (or not), serving a request."""

    def __init__(self, how: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TARGET, how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "ready\n"
        self.pid = self.process.pid

    def finish(self) -> tuple[str, str]:
        """Let it end; return what it wrote after "ready"."""
        out, err = self.process.communicate("\n", timeout=JOIN)
        assert self.process.returncode == 0, err
        return out, err


@pytest.fixture
def target(request: pytest.FixtureRequest, runtime_dir: Path) -> Iterator[Target]:
    started = Target(getattr(request, "param", "installed"))
    try:
        yield started
    finally:
        if started.process.returncode is None:  # the test did not finish it
            started.process.kill()
            started.process.communicate(timeout=JOIN)


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threadctx", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.other_threads_stacks
def test_dump_prints_the_report_of_the_other_process(target: Target, runtime_dir: Path) -> None:
    result = command("dump", str(target.pid))
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert report.startswith(f"threadctx dump: 2 threads in process {target.pid} ")
    assert report.splitlines()[1].startswith("reader: "), "which reader the process reads contexts with"
    assert report.endswith("end of threadctx dump\n")
    worker = report.split('Thread "worker-1"', 1)[1]
    assert 'span_name="charge"' in worker
    assert "correlation: request_id=req-cli" in worker
    assert "in charge_card" in worker
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert list(runtime_dir.iterdir()) == [], "nothing left behind"
    out, err = target.finish()
    assert (out, err) == ("bye\n", ""), "the report went to the command, not to the process's stderr"


def test_a_second_dump_works_too(target: Target) -> None:
    for _ in range(2):
        result = command("dump", str(target.pid), "--signal", "SIGUSR1")
        assert result.returncode == 0, result.stderr
        assert "request_id=req-cli" in result.stdout


@pytest.mark.parametrize("target", ["not installed"], indirect=True)
def test_a_process_that_did_not_install_the_signal_is_not_sent_it(target: Target) -> None:
    if not Path(f"/proc/{target.pid}/status").exists():
        pytest.skip("needs /proc to tell whether a process catches a signal")
    result = command("dump", str(target.pid))
    assert result.returncode == 1
    assert result.stderr == (
        f"python -m threadctx dump: error: process {target.pid} does not catch SIGUSR1: it did not call "
        "threadctx.install_dump_signal() (the signal would end it, so it was not sent)\n"
    )
    assert target.finish() == ("bye\n", ""), "still alive"


@pytest.mark.parametrize("target", ["other handler"], indirect=True)
def test_a_process_whose_handler_is_not_threadctxs_times_out_with_the_reasons(
    target: Target, runtime_dir: Path
) -> None:
    result = command("dump", str(target.pid), "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"python -m threadctx dump: error: process {target.pid} did not answer within 0.5s: it catches "
        "SIGUSR1, but not with threadctx.install_dump_signal() (another handler?)"
    )
    assert list(runtime_dir.iterdir()) == [], "the request is withdrawn"
    assert target.finish() == ("bye\n", "")


def test_no_such_process(runtime_dir: Path) -> None:
    code = "import os; print(os.getpid())"
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pid = ended.stdout.strip()
    result = command("dump", pid)
    assert result.returncode == 1
    assert result.stderr == f"python -m threadctx dump: error: no process with pid {pid}\n"


def test_a_process_of_another_user(runtime_dir: Path) -> None:
    """As root: the command drops to nobody and asks this process; otherwise it asks init (root's)."""
    if os.getuid() == 0:
        # Everything imported first: as nobody, the interpreter can't read root's files any more
        # (argparse's gettext would import locale late, on some versions).
        code = (
            "import argparse, gettext, locale, os, shutil, sys, textwrap\n"
            "from threadctx.__main__ import main\n"
            f"os.setgid(65534); os.setuid(65534)\nsys.exit(main(['dump', '{os.getpid()}']))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        pid = os.getpid()
    else:
        result, pid = command("dump", "1"), 1
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"python -m threadctx dump: error: process {pid} belongs to another user; run this command as "
    )


def test_help_explains_the_command() -> None:
    result = command("--help")
    assert result.returncode == 0
    assert "install_dump_signal()" in result.stdout
    assert "dump" in result.stdout
    sub = command("dump", "--help")
    assert sub.returncode == 0
    for option in ("PID", "--timeout", "--signal", "--force"):
        assert option in sub.stdout
    assert command().returncode == 2
    bad = command("dump", "0")
    assert (bad.returncode, bad.stderr.splitlines()[-1]) == (
        2,
        "python -m threadctx dump: error: PID must be a positive process id, not 0",
    )


def test_the_handler_answers_a_request_with_a_file_only_this_user_can_read(runtime_dir: Path) -> None:
    """In this process: a request file turns the next signal's report into a 0600 file; then as before."""
    exchange.check_private_dir(str(runtime_dir), create=True)
    request = Path(exchange.request_path(str(runtime_dir), os.getpid()))
    report = Path(exchange.report_path(str(runtime_dir), os.getpid()))
    read_end, write_end = os.pipe()
    previous = threadctx.install_dump_signal(file=write_end)
    try:
        request.touch(0o600)
        signal.raise_signal(signal.SIGUSR1)
        assert not request.exists(), "the request was taken"
        assert stat.S_IMODE(report.stat().st_mode) == 0o600
        assert report.read_text().endswith("end of threadctx dump\n")
        signal.raise_signal(signal.SIGUSR1)  # no request: to the file descriptor, as installed
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        assert pipe.read().endswith("end of threadctx dump\n")


def test_the_runtime_directory_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(exchange.RUNTIME_DIR_ENV, raising=False)
    uid = os.getuid()
    assert exchange.runtime_dir() in (f"/run/user/{uid}/threadctx", f"/tmp/threadctx-{uid}")
    real = tmp_path / "real"
    real.mkdir(0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(exchange.RuntimeDirError, match="is not a directory"):
        exchange.check_private_dir(str(link), create=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(exchange.RuntimeDirError, match=r"can be entered by other users \(mode 755\)"):
        exchange.check_private_dir(str(shared), create=False)
    with pytest.raises(exchange.RuntimeDirError, match="cannot use"):
        exchange.check_private_dir(str(tmp_path / "missing"), create=False)
    exchange.check_private_dir(str(tmp_path / "new"), create=True)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_a_request_in_a_directory_others_can_enter_is_ignored(runtime_dir: Path) -> None:
    """Someone else could have put it there: the report goes where it was installed to go."""
    runtime_dir.mkdir(0o700)
    runtime_dir.chmod(0o777)
    request = Path(exchange.request_path(str(runtime_dir), os.getpid()))
    request.touch()
    read_end, write_end = os.pipe()
    previous = threadctx.install_dump_signal(file=write_end)
    try:
        signal.raise_signal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        assert pipe.read().endswith("end of threadctx dump\n")
    assert sorted(path.name for path in runtime_dir.iterdir()) == [request.name], "no report written there"


def test_the_runtime_directory_must_not_sit_where_others_can_replace_it(tmp_path: Path) -> None:
    """Another user who can write to its parent can swap it for a symlink between the check and the use."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # as a careless THREADCTX_RUNTIME_DIR=/srv/shared/threadctx could be
    with pytest.raises(exchange.RuntimeDirError, match=r"other users can replace it"):
        exchange.check_private_dir(str(shared / "threadctx"), create=True)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: only the owner may rename or remove what is in it
    exchange.check_private_dir(str(sticky / "threadctx"), create=True)
