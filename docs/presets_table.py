"""Print the presets of ``threadctx.PRESETS`` as the Markdown table of docs/logging.md.

After adding or changing a preset, paste the output into docs/logging.md::

    python docs/presets_table.py

``tests/test_docs.py`` fails while the page and the presets disagree.
"""

from __future__ import annotations

from threadctx._vendors import NAME_KEYS, PRESETS, FieldNames


def _describe(names: FieldNames) -> tuple[str, str, str]:
    """(fields, value format, outside a span) of one entry."""
    written = [f"`{getattr(names, key)}`" for key in NAME_KEYS if getattr(names, key) is not None]
    if names.trace_id is None:
        fmt = "-"
    elif names.id_format == "datadog":
        fmt = "decimal; trace id in 32 hex digits when its high 64 bits are non-zero"
    elif names.id_format == "gcp":
        fmt = "`projects/PROJECT/traces/` + 32 hex; span id 16 hex"
    else:
        fmt = "32 and 16 lowercase hex digits"
    if names.trace_id is None:
        outside = "-"
    elif names.without_span == "omit":
        outside = "nothing"
    else:
        outside = f"`{names.missing_trace_id}`" if len(names.missing_trace_id) < 4 else "zeros"
    return " ".join(written) or "-", fmt, outside


def table() -> str:
    """The presets as the Markdown table of docs/logging.md."""
    lines = [
        "| preset | fields | ids | outside a span | follows |",
        "|---|---|---|---|---|",
    ]
    for preset, names in PRESETS.items():
        written, fmt, outside = _describe(names)
        lines.append(f"| `{preset}` | {written} | {fmt} | {outside} | <{names.source}> |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
