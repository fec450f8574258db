"""Rendering untrusted text: escaped so that a value can never forge or hide a line.

The bottom layer: it imports nothing of threadctx's.
"""

from __future__ import annotations

__all__ = ["printable", "show"]


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped, so a value cannot forge a line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def show(value: str) -> str:
    """A short, escaped rendering of untrusted text for an error message (at most 65 characters)."""
    shown = value[:60].encode("unicode_escape").decode("ascii")
    if len(shown) > 60 or len(value) > 60:
        shown = shown[:60] + "..."
    return f"'{shown}'"
