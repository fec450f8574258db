"""One version, one changelog section per release, and docstring notes that name real releases."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import threadctx

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: pytest itself requires tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"^## \[(?P<version>[^\]]+)\] - (?P<date>.+)$", re.M)
NOTE = re.compile(r"\.\. (?P<kind>versionadded|versionchanged|deprecated):: (?P<version>\S+)")


def changelog_sections() -> list[tuple[str, str]]:
    """(version, date) of each release section of CHANGELOG.md, newest first."""
    return [(m["version"], m["date"]) for m in SECTION.finditer((ROOT / "CHANGELOG.md").read_text())]


def test_the_changelog_has_one_dated_section_per_release_and_one_for_the_next() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## .*$", text, re.M)
    sections = changelog_sections()
    assert len(headings) == len(sections), f"every release heading is '## [X.Y.Z] - date': {headings}"
    versions = [version for version, _ in sections]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions), versions
    assert len(set(versions)) == len(versions)
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))), reverse=True)
    for index, (version, date) in enumerate(sections):
        if date == "Unreleased":
            assert index == 0, f"only the newest section may be unreleased, not {version}"
        else:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), f"{version}: a date is YYYY-MM-DD, not {date!r}"
        # Keep a Changelog: each version links to where it is published.
        assert re.search(rf"^\[{re.escape(version)}\]: https://\S+$", text, re.M), f"no link for {version}"


def test_the_version_is_set_once_and_is_the_newest_changelog_section() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project.get("dynamic", [])
    assert changelog_sections()[0][0] == project["version"]
    assert threadctx.__version__ == project["version"], "installed metadata out of date: reinstall"
    # No module writes a version of its own.
    for path in (ROOT / "src").rglob("*.py"):
        assert not re.search(r"^__version__\s*=\s*['\"]", path.read_text(), re.M), path


def test_versionadded_and_versionchanged_notes_name_versions_in_the_changelog() -> None:
    released = {version for version, _ in changelog_sections()}
    notes = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for match in NOTE.finditer(path.read_text()):
            notes.append((path.relative_to(ROOT).as_posix(), match["kind"], match["version"]))
    assert notes, "the public names carry versionadded notes"
    wrong = [note for note in notes if note[2] not in released]
    assert wrong == [], f"notes naming no release in CHANGELOG.md ({sorted(released)}): {wrong}"
    # A first release changes nothing: everything in it is simply added.
    if len(released) == 1:
        assert [note for note in notes if note[1] != "versionadded"] == []
