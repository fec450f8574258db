"""The examples run as a user runs them, in their own interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
    result = run("demo.py", "--requests", "64", "--workers", "8", "--lines", "4")
    assert result.returncode == 0, result.stderr
    assert "runtime context: ThreadRuntimeContext" in result.stdout
    assert re.search(r"lines attributed to the wrong request\s+0  ok", result.stdout)
    assert re.search(r"log lines\s+256  ok", result.stdout)


def test_demo_rejects_bad_options() -> None:
    result = run("demo.py", "--workers", "0")
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr


def test_quickstart_threads_log_their_own_request_ids() -> None:
    result = run("quickstart.py")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stderr.splitlines())
    assert len(lines) == 2
    for index, line in enumerate(lines):
        assert re.fullmatch(
            rf"worker-{index} trace_id=[0-9a-f]{{32}} request_id=req-{index} processing", line
        )
    assert lines[0].split()[1] != lines[1].split()[1]  # two traces


def test_readme_quick_start_runs() -> None:
    """The README's quick start block, as a user pastes it, then one call of its handler."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    result = subprocess.run(
        [sys.executable, "-c", block + '\nhandle("req-readme")\n'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"MainThread trace_id=[0-9a-f]{32} request_id=req-readme processing\n", result.stderr)
