"""The documentation's code runs, and its facts match the code.

In docs/*.md, the ```python blocks of one page form one program: they run in order, as a script
in a fresh interpreter and an empty directory, as a reader would paste them into a file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.instrumentation") is None,
    reason="the docs' examples use the opentelemetry-instrumentation packages of the test group",
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


NEWER = re.compile(r"# Python (?P<major>\d+)\.(?P<minor>\d+) and later")


def runs_here(block: str) -> bool:
    """Whether this Python runs ``block``: one whose first line says "# Python 3.12 and later" needs 3.12."""
    newer = NEWER.match(block)
    return newer is None or sys.version_info >= (int(newer["major"]), int(newer["minor"]))


INSTRUMENTATION = re.compile(r"^\s*(?:from|import) (opentelemetry\.instrumentation\.\w+)", re.M)


def run_page(page: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """The page's program, as a script file (so that spawned processes can import it).

    Skipped, with the reason, where an instrumentation package the program imports is not
    installed (make pytest-newest leaves out one not released with the others yet).
    """
    program = "\n\n".join(block for block in BLOCK.findall(page.read_text()) if runs_here(block))
    for module in sorted(set(INSTRUMENTATION.findall(program))):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{page.name} imports {module}, which is not installed here")
    script = directory / f"{page.stem}_page.py"
    script.write_text(program)
    return run_script(script, directory)


def run_script(script: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, in ``directory``, on the runtime context it selects itself."""
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pages_are_found() -> None:
    assert {page.stem for page in PAGES} >= {"index", "quickstart", "concepts", "logging", "propagation"}


@pytest.mark.parametrize(
    "page", [page for page in PAGES if BLOCK.search(page.read_text())], ids=lambda page: page.name
)
def test_the_python_blocks_of_a_page_run(page: Path, tmp_path: Path) -> None:
    result = run_page(page, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--- Logging error ---" not in result.stderr, result.stderr


@pytest.mark.parametrize("page", ["fastapi", "flask", "django"])
def test_a_framework_page_logs_outside_a_request_without_a_logging_error(page: str, tmp_path: Path) -> None:
    """A line at start-up has no request_id bound: the page's formatter gives it "-"."""
    result = run_page(DOCS / f"{page}.md", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--- Logging error ---" not in result.stderr, result.stderr
    assert "MainThread request_id=- starting" in result.stdout.splitlines()


def test_the_pitfalls_loguru_default_leaves_a_bound_id_alone(tmp_path: Path) -> None:
    result = run_page(DOCS / "pitfalls.md", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[lines.index("- starting") + 1] == "r-1 serving"


QUEUE_BLOCK = "# Python 3.12 and later: dictConfig's queue_handler form"


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="dictConfig's queue_handler form is new in Python 3.12"
)
def test_the_pitfalls_queue_handler_block_stamps_each_line_in_its_thread(tmp_path: Path) -> None:
    """Issue 21.5: with the filter on the target handler, 640 of 640 records had the listener's context."""
    result = run_page(DOCS / "pitfalls.md", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[-3:]) == [
        "MainThread request_id=- outside",
        "worker-0 request_id=r-0 handled",
        "worker-1 request_id=r-1 handled",
    ]
    # The same block with the filter where most users put it, on the listener's handler: no ids.
    (block,) = [
        block for block in BLOCK.findall((DOCS / "pitfalls.md").read_text()) if block.startswith(QUEUE_BLOCK)
    ]
    moved = block.replace('"formatter": "plain",', '"formatter": "plain", "filters": ["context"],')
    moved = moved.replace('"filters": ["context"],  # here', "# not here")
    assert moved.count('"filters": ["context"]') == 1
    script = tmp_path / "target_filter.py"
    script.write_text("import threadctx\n" + moved)
    lines = run_script(script, tmp_path).stdout.splitlines()
    assert sorted(lines) == [
        "MainThread request_id=- outside",
        "worker-0 request_id=- handled",
        "worker-1 request_id=- handled",
    ]


def test_no_page_has_code_that_is_not_run() -> None:
    """Python code is in ```python blocks (run), never in blocks the tests would skip."""
    for page in PAGES:
        assert not re.search(r"^```(py|python3)$", page.read_text(), re.M), page.name


def test_the_quick_start_prints_one_line_per_thread_with_its_own_ids(tmp_path: Path) -> None:
    result = run_page(DOCS / "quickstart.md", tmp_path)
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("worker-"))
    assert len(lines) == 2, result.stderr
    for index, line in enumerate(lines):
        assert re.fullmatch(
            rf"worker-{index} trace_id=[0-9a-f]{{32}} request_id=req-{index} processing", line
        )


def masked(text: str) -> str:
    """Text with the parts that change from run to run (ids, numbers) masked."""
    return re.sub(r"\d+", "N", re.sub(r"[0-9a-f]{16,32}", "ID", text))


def test_the_logging_pages_output_blocks_are_what_its_program_prints(tmp_path: Path) -> None:
    """Each ```text block after a program block shows that block's output; together, the whole output."""
    page = DOCS / "logging.md"
    expected = "".join(re.findall(r"^```text\n(.*?)^```$", page.read_text(), re.M | re.S))
    result = run_page(page, tmp_path)
    assert result.returncode == 0, result.stderr
    assert masked(result.stdout) == masked(expected)


@pytest.mark.other_threads_stacks
def test_the_operations_page_prints_what_it_shows(tmp_path: Path) -> None:
    """The watchdog's line, the metric and the dump's order are what the page's output blocks show."""
    page = (DOCS / "operations.md").read_text()
    result = run_page(DOCS / "operations.md", tmp_path)
    assert result.returncode == 0, result.stderr
    shown = re.findall(r"^```text\n(.*?)^```$", page, re.M | re.S)
    printed = masked(result.stdout)
    (warning,) = [block for block in shown if block.startswith("WARNING req-17")]
    assert masked(warning) in printed
    assert "busy threads: 1\n" in shown
    assert "busy threads: 1\n" in result.stdout
    threadz_row = "worker-9 charge card {'request_id': 'req-17'} True\n"
    assert threadz_row in shown
    assert threadz_row in result.stdout
    (report,) = [block for block in shown if block.startswith("threadctx dump: 2 threads")]
    for part in (report, result.stdout):
        assert re.findall(r'^Thread "([^"]+)"', part, re.M) == ["worker-7", "MainThread"]
        assert re.search(r"^  started_at=\S+Z elapsed=\d+\.\d{3}s$", part, re.M)
        assert "in charge_card\n      release.wait(30)" in part


def test_the_quick_start_logs_outside_a_request_without_a_logging_error(tmp_path: Path) -> None:
    """Issue 11 item 13: its handler formats %(request_id)s, which lines outside a request lack."""
    result = run_page(DOCS / "quickstart.md", tmp_path)
    assert "Logging error" not in result.stderr
    assert f"MainThread trace_id={'0' * 32} request_id=- started" in result.stderr.splitlines()


def test_the_readmes_quick_start_logs_outside_a_request_without_a_logging_error(tmp_path: Path) -> None:
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (code,) = BLOCK.findall(section)
    script = tmp_path / "readme_quickstart.py"
    script.write_text(code + '\nlogging.getLogger("some.library").warning("outside")\nhandle("req-1")\n')
    result = run_script(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr
    lines = result.stderr.splitlines()
    assert f"MainThread trace_id={'0' * 32} request_id=- outside" in lines
    assert any(
        re.fullmatch(r"MainThread trace_id=[0-9a-f]{32} request_id=req-1 processing", line) for line in lines
    )


def test_the_presets_table_is_the_codes() -> None:
    """docs/logging.md's backend table is what docs/presets_table.py makes of PRESETS."""
    spec = importlib.util.spec_from_file_location("presets_table", DOCS / "presets_table.py")
    assert spec is not None
    assert spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.table() in (DOCS / "logging.md").read_text()
