"""Checks an installed threadctx (a wheel or an sdist in a clean virtualenv), as a user would run it.

    python .ci/check_install.py --reader compiled --quickstart examples/quickstart.py
    python .ci/check_install.py --reader mirror --reason not-built

Prints which threadctx and which reader the interpreter runs, fails if the reader (and reason) is
not the one expected, or if threadctx is imported from a source tree instead of the installation,
then runs the quick start in this same process, with that reader.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # as the quick start does, before OpenTelemetry

from opentelemetry import context as otel_context

import threadctx


def main() -> int:
    """Check the installation as the arguments say; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reader", choices=["compiled", "mirror"], required=True)
    parser.add_argument("--reason", help="the reason reader_info() must give (default: any)")
    parser.add_argument("--quickstart", type=Path, help="a script to run afterwards, as __main__")
    args = parser.parse_args()

    info = threadctx.reader_info()
    location = Path(threadctx.__file__).resolve()
    print(f"threadctx {threadctx.__version__} from {location} on Python {sys.version.split()[0]}")
    print(f"reader: {info}")
    problems = []
    if "site-packages" not in location.parts:
        problems.append(f"threadctx is imported from {location}, not from an installation")
    if info.name != args.reader:
        problems.append(f"expected the {args.reader} reader")
    if not isinstance(otel_context._RUNTIME_CONTEXT, threadctx.ThreadRuntimeContext):
        problems.append(f"the runtime context is {type(otel_context._RUNTIME_CONTEXT).__name__}")
    if args.reason is not None and info.reason != args.reason:
        problems.append(f"expected the reason {args.reason!r}")
    if problems:
        print("check_install: " + "; ".join(problems), file=sys.stderr)
        return 1
    if args.quickstart is not None:
        runpy.run_path(str(args.quickstart), run_name="__main__")
        header = threadctx.dump(frames=0).splitlines()[1]
        print(f"dump(): {header}")
        if header != f"reader: {info}":
            print("check_install: dump() does not say which reader is in use", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
