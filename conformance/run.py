"""Run OpenTelemetry's own test suites on the default runtime context and on threadctx's.

Downloads the source distributions of the pinned releases (conformance/pins.txt)
from PyPI into .conformance/ (nothing of them is committed), installs the pins
and this checkout into a private virtualenv, runs each suite twice, and fails
if any test fails on threadctx that passes on the default.

Usage: python conformance/run.py [--python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".conformance"
PINS = ROOT / "conformance" / "pins.txt"

# distribution -> the test folders of its sdist to run
SUITES = {
    "opentelemetry-api": ["tests/context", "tests/trace", "tests/logs"],
    "opentelemetry-sdk": ["tests/context", "tests/trace", "tests/logs"],
    "opentelemetry-instrumentation-threading": ["tests"],
}

# Written into the API's test tree at run time: the API's own conformance base
# class, run against ThreadRuntimeContext exactly as the API runs it against
# ContextVarsRuntimeContext in tests/context/test_contextvars_context.py.
OUR_CASE = """\
from unittest.mock import patch

from opentelemetry import context
from tests.context.base_context import ContextTestCases

from threadctx import ThreadRuntimeContext


class TestThreadctxRuntimeContext(ContextTestCases.BaseTest):
    def setUp(self):
        super().setUp()
        self.mock_runtime = patch.object(context, "_RUNTIME_CONTEXT", ThreadRuntimeContext())
        self.mock_runtime.start()

    def tearDown(self):
        super().tearDown()
        self.mock_runtime.stop()
"""


def run(*cmd: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(part) for part in cmd), flush=True)
    return subprocess.run([str(part) for part in cmd], check=True, text=True, **kwargs)  # type: ignore[call-overload]


def pinned(name: str) -> str:
    for line in PINS.read_text().splitlines():
        if line.startswith(name + "=="):
            return line.strip()
    raise SystemExit(f"{name} is not pinned in {PINS}")


def prepare(python: str) -> tuple[Path, dict[str, Path]]:
    venv = WORK / "venv"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        run(python, "-m", "venv", venv)
        run(venv / "bin" / "pip", "install", "-q", "-r", PINS, "-e", ROOT)
        (venv / ".installed").touch()
    sources: dict[str, Path] = {}
    downloads = WORK / "sdists"
    for name in SUITES:
        requirement = pinned(name)
        version = requirement.split("==")[1]
        stem = f"{name.replace('-', '_')}-{version}"
        tree = WORK / "src" / stem
        if not tree.exists():
            run(
                venv / "bin" / "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                downloads,
                requirement,
            )
            with tarfile.open(downloads / f"{stem}.tar.gz") as archive:
                archive.extractall(WORK / "src", filter="data") if sys.version_info >= (3, 12) else (
                    archive.extractall(WORK / "src")
                )
        sources[name] = tree
    (sources["opentelemetry-api"] / "tests" / "context" / "test_threadctx_context.py").write_text(OUR_CASE)
    return venv, sources


def outcomes(report: Path) -> dict[str, str]:
    results: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            results[test_id] = "failed"
        elif case.find("skipped") is not None:
            results[test_id] = "skipped"
        else:
            results[test_id] = "passed"
    return results


def run_suite(venv: Path, tree: Path, folders: list[str], backend: str) -> dict[str, str]:
    report = WORK / "reports" / f"{tree.name}-{backend}.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        # The sdist's own pyproject.toml as the config, not this repository's one above it.
        "-c",
        str(tree / "pyproject.toml"),
        "--rootdir",
        str(tree),
        *folders,
    ]
    if backend == "threadctx":
        env["PYTHONPATH"] = str(ROOT / "conformance")
        cmd[3:3] = ["-p", "threadctx_conformance"]
    print(f"\n=== {tree.name} on {backend}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=False)
    if not report.exists():
        raise SystemExit(f"{tree.name} on {backend}: pytest wrote no report")
    return outcomes(report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter for the private virtualenv")
    args = parser.parse_args()
    venv, sources = prepare(args.python)
    regressions: list[str] = []
    lines = []
    for name, folders in SUITES.items():
        default = run_suite(venv, sources[name], folders, "default")
        ours = run_suite(venv, sources[name], folders, "threadctx")
        passed_default = {t for t, o in default.items() if o == "passed"}
        passed_ours = {t for t, o in ours.items() if o == "passed"}
        if not passed_default:
            raise SystemExit(f"{name}: no test passed on the default runtime context; the run proves nothing")
        lost = sorted(passed_default - passed_ours)
        regressions += [f"{name}: {test}" for test in lost]
        counts = (len(default), len(passed_default), len(ours), len(passed_ours), len(lost))
        lines.append(f"| {name} | " + " | ".join(map(str, counts)) + " |")
    print(
        "\n| suite | tests (default) | passed (default) | tests (threadctx) | passed (threadctx) "
        "| pass on default, fail on threadctx |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    if regressions:
        print("\nFAILED on threadctx, passed on the default runtime context:")
        print("\n".join(f"  {test}" for test in regressions))
        return 1
    print("\nconformance: every test that passes on the default runtime context passes on threadctx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
