"""The examples run as a user runs them, in their own interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_passes_its_own_checks() -> None:
    result = run("demo.py", "--requests", "64", "--workers", "4", "--clients", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runtime context ThreadRuntimeContext" in result.stdout
    for check in (
        r"requests answered, X-Request-ID echoed\s+64  ok",
        r"threads busy in the snapshot\s+4  ok",
        r"log lines of the requests\s+256  ok",
        r"lines attributed to the wrong request\s+0  ok",
        r"spans whose parent is the caller's\s+64  ok",
    ):
        assert re.search(check, result.stdout), check
    snapshot = result.stdout.split("mid-flight (threadctx.snapshot()):\n", 1)[1].split("\n\n", 1)[0]
    assert len(set(re.findall(r"request_id=(req-\d+)", snapshot))) == 4, "four threads, four requests"


def test_demo_help_names_its_options() -> None:
    result = run("demo.py", "--help")
    assert result.returncode == 0
    for option in ("--requests", "--workers", "--clients"):
        assert option in result.stdout


def test_demo_rejects_bad_options() -> None:
    result = run("demo.py", "--workers", "0")
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr


def test_quickstart_threads_log_their_own_request_ids() -> None:
    """Two workers with their own ids, and a line outside any request that logs "-" (no logging error)."""
    result = run("quickstart.py")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stderr.splitlines())
    assert len(lines) == 3, result.stderr
    assert lines[0] == f"MainThread trace_id={'0' * 32} request_id=- starting"
    for index, line in enumerate(lines[1:]):
        assert re.fullmatch(
            rf"worker-{index} trace_id=[0-9a-f]{{32}} request_id=req-{index} processing", line
        )
    assert lines[1].split()[1] != lines[2].split()[1]  # two traces


def test_readme_quick_start_is_the_example() -> None:
    """The README's quick start block, as a user pastes it, is examples/quickstart.py (run above)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = (EXAMPLES / "quickstart.py").read_text()
    assert example.split('"""\n\n', 1)[1] == block


def test_thread_pool_example_carries_each_request_into_pools_and_threads() -> None:
    result = run("thread_pool.py")
    assert result.returncode == 0, result.stderr
    assert "tasks that saw another request's id: 0" in result.stdout
    for where in ("ContextThreadPoolExecutor", "a plain ThreadPoolExecutor", "a plain Thread"):
        lines = [line for line in result.stdout.splitlines() if line.endswith(f"in {where}")]
        assert sorted(line.split("request_id=")[1].split()[0] for line in lines) == [
            "req-0",
            "req-1",
            "req-2",
        ]


def test_process_pool_example_children_log_with_the_parents_ids() -> None:
    result = run("process_pool.py")
    assert result.returncode == 0, result.stderr
    assert "tasks that ran with another context: 0" in result.stdout
    lines = result.stdout.splitlines()
    parent_pid = lines[0].split()[0]
    for index in range(3):
        (sent,) = [line for line in lines if f"request_id=req-{index} " in line and "sending" in line]
        (crunched,) = [line for line in lines if f"request_id=req-{index} " in line and "crunching" in line]
        assert crunched.split()[0] != parent_pid, "the work ran in a child process"
        assert crunched.split()[1] == sent.split()[1], "with the parent's trace id"
        assert "tenant=acme" in crunched


def test_wsgi_service_example_self_test() -> None:
    result = run("wsgi_service.py", "--port", "0", "--self-test", "64")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "requests=64 log_lines=128 misattributed=0" in result.stdout


class Service:
    """examples/wsgi_service.py in a process of its own, on a free port of 127.0.0.1."""

    def __init__(self, name: str, *args: str) -> None:
        env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
        command = [sys.executable, str(EXAMPLES / "wsgi_service.py"), "--name", name, "--port", "0", *args]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", first)
        assert match, first + self.process.stderr.read()  # type: ignore[union-attr]
        self.url = match[1]

    def stop(self) -> list[str]:
        """Stop the service; return its log lines."""
        self.process.terminate()
        out, _ = self.process.communicate(timeout=60)
        return out.splitlines()


def test_two_services_b_logs_with_as_trace_id_and_request_id() -> None:
    """A calls B over HTTP on 127.0.0.1; B's lines carry A's trace id and the request id A was given."""
    b = Service("B")
    try:
        a = Service("A", "--downstream", f"{b.url}/work")
        try:
            request = urllib.request.Request(f"{a.url}/order", headers={"X-Request-ID": "req-two-services"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
                assert response.headers["X-Request-ID"] == "req-two-services"
        finally:
            a_lines = a.stop()
    finally:
        b_lines = b.stop()

    def ours(lines: list[str]) -> list[str]:
        return [line for line in lines if "request_id=req-two-services" in line]

    a_traces = {line.split("trace_id=")[1].split()[0] for line in ours(a_lines)}
    assert len(a_traces) == 1, a_lines
    (a_trace,) = a_traces
    assert a_trace != "0" * 32
    assert len(ours(a_lines)) == 3, "handling, pool task, downstream answered"
    assert len(ours(b_lines)) == 2, b_lines
    for line in ours(b_lines):
        assert line.startswith(f"service=B trace_id={a_trace} "), line


WARNING = re.compile(
    r'^WARNING threadctx\.watchdog trace_id=([0-9a-f]{32}) request_id=req-o1 thread "worker_1" '
    r"\(ident=\d+\) has served its span for \d+\.\ds \(threshold 0\.5s\)$"
)


def check_stuck_pool_output(lines: list[str]) -> None:
    """The watchdog's warning names the stuck worker, in its trace; the metrics show it; every order ends."""
    (first,) = [line for line in lines if line.startswith("WARNING")]
    match = WARNING.match(first)
    assert match, first
    details = "\n".join(lines[lines.index(first) + 1 :])
    assert f"  trace_id={match[1]} span_id=" in details, "the record's trace id is the stuck span's"
    assert 'span_name="order o1"' in details
    assert "  correlation: request_id=req-o1 tenant=acme" in details
    assert "in charge_card\n      release.wait()" in details
    assert "metric threadctx.threads.busy = 1 {thread}" in lines
    (age,) = [line for line in lines if line.startswith("metric threadctx.span.oldest_age = ")]
    assert float(age.split()[3]) >= 0.5
    assert lines[-1] == "done: o0, o1, o2"


@pytest.mark.other_threads_stacks
def test_stuck_pool_example_shows_the_operator_the_stuck_request() -> None:
    result = run("stuck_pool.py")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_stuck_pool_output(result.stdout.splitlines())


@pytest.mark.other_threads_stacks
def test_stuck_pool_example_answers_the_dump_command() -> None:
    """The operator's second process: `python -m threadctx dump PID` while o1 is stuck."""
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / "stuck_pool.py"), "--wait"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin
        assert process.stdout
        try:
            lines = []
            while not lines or not lines[-1].startswith(f"pid {process.pid}: order o1 is stuck."):
                line = process.stdout.readline()
                assert line, "\n".join(lines)
                lines.append(line.rstrip("\n"))
            command = subprocess.run(
                [sys.executable, "-m", "threadctx", "dump", str(process.pid)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            process.stdin.write("\n")
            process.stdin.flush()
            rest, errors = process.communicate(timeout=60)
        finally:
            process.kill()
    assert command.returncode == 0, command.stderr
    assert errors == "", "the report went to the command, not to the example's stderr"
    check_stuck_pool_output(lines[:-1] + rest.splitlines())
    report = command.stdout
    threads = re.findall(r'^Thread "([^"]+)"', report, re.M)
    assert threads[0] == "worker_1", "the busy thread first"
    stuck = report.split("\n\n")[1]
    assert "correlation: request_id=req-o1 tenant=acme" in stuck
    assert 'span_name="order o1"' in stuck
    assert "elapsed=" in stuck
    assert "in charge_card" in stuck
    assert report.count("correlation:") == 1, "o0 and o2 are done: their workers hold no request"
