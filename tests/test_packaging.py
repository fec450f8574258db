"""What a user installs: the built wheel and sdist, their license and the metadata a user reads."""

from __future__ import annotations

import email
import email.message
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: pytest itself requires tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the 'build' package (test group) builds the wheel and sdist")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def test_the_wheel_carries_the_license_and_its_metadata_names_it(dist: Path) -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text
    assert "Version 2.0" in license_text
    (wheel,) = dist.glob("threadctx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        (license_name,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name).decode() == license_text
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]


def test_the_sdist_carries_the_license(dist: Path) -> None:
    (sdist,) = dist.glob("threadctx-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(name.endswith("/LICENSE") and name.count("/") == 1 for name in names), names


def _metadata(dist: Path) -> email.message.Message:
    (wheel,) = dist.glob("threadctx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def _name(requirement: str) -> str:
    """The normalized project name a requirement line starts with."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()  # type: ignore[index]


#: The extras a user may install: one per integration, named after what it integrates.
INTEGRATION_EXTRAS = {
    "sdk",
    "json",
    "structlog",
    "loguru",
    "waitress",
    "flask",
    "django",
    "fastapi",
    "celery",
    "grpc",
    "dask",
}


def test_the_wheel_requires_no_test_or_development_tool(dist: Path) -> None:
    """Requires-Dist: opentelemetry-api, then one package set per integration extra; the tools are groups."""
    metadata = _metadata(dist)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(metadata.get_all("Provides-Extra") or []) == INTEGRATION_EXTRAS
    required = metadata.get_all("Requires-Dist") or []
    unconditional = [line for line in required if "extra ==" not in line]
    assert [_name(line) for line in unconditional] == ["opentelemetry-api"]
    published = {_name(line) for line in required}
    # Every package only the dependency groups name (test, lint, docs, benchmarks, release tools).
    runtime = {
        _name(line) for lines in project["project"]["optional-dependencies"].values() for line in lines
    }
    runtime.add("opentelemetry-api")
    tools = {
        _name(entry)
        for entries in project["dependency-groups"].values()
        for entry in entries
        if isinstance(entry, str)
    } - runtime
    assert {"pytest", "hypothesis", "mypy", "ruff", "sphinx", "build", "twine", "gevent"} <= tools
    assert published & tools == set()
    assert not [line for line in required if "==" in line.split(";")[0]], "no exact pins for users"


def test_the_metadata_says_what_is_tested_and_where_to_read_more(dist: Path) -> None:
    metadata = _metadata(dist)
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL") or [])
    assert {"Source", "Issues", "Changelog", "Documentation"} <= set(urls)
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    classifiers = metadata.get_all("Classifier") or []
    for framework in ("Django", "Flask", "FastAPI", "Celery"):
        assert f"Framework :: {framework}" in classifiers
    versions = sorted(c.rsplit(" ", 1)[1] for c in classifiers if re.fullmatch(r".* :: 3\.\d+", c))
    assert versions == [f"3.{minor}" for minor in range(10, 16)]
    assert metadata["Requires-Python"] == ">=3.10"
    # Free-threaded builds run the pure-Python mirror, which CI does not run on one: no such claim.
    assert not [c for c in classifiers if "Free Threading" in c]
