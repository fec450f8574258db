"""gevent and eventlet: greenlets never see each other's context; a spawned greenlet starts clean.

Each case runs in a fresh interpreter, with the monkey patching applied before or after threadctx
and OpenTelemetry are imported.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import sys

    LIBRARY, ORDER = sys.argv[1], sys.argv[2]


    def patch():
        if LIBRARY == "gevent":
            from gevent import monkey

            monkey.patch_all()
        else:
            import eventlet

            eventlet.monkey_patch()


    if ORDER == "before":
        patch()
    import io
    import logging
    import os

    os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"
    import threadctx
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    if ORDER == "after":
        patch()
    if LIBRARY == "gevent":
        import gevent

        spawn, switch, result = gevent.spawn, lambda: gevent.sleep(0), lambda g: g.get()
    else:
        import eventlet

        spawn, switch, result = eventlet.spawn, lambda: eventlet.sleep(0), lambda g: g.wait()

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(threadctx.ContextFilter())
    fmt = "%(trace_id)s %(request_id)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, defaults={"request_id": "-"}))
    log = logging.getLogger("greenlets")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


    def observe():
        span_context = trace.get_current_span().get_span_context()
        return (span_context.span_id if span_context.is_valid else None, dict(threadctx.correlation()))


    def work(n):
        seen = []
        with threadctx.bound(request_id=f"g{n}"):
            span = NonRecordingSpan(SpanContext(n + 1, n + 1, False))
            token = context.attach(trace.set_span_in_context(span))
            for _ in range(3):
                switch()  # hand over to the other greenlets
                seen.append(observe())
                log.info("g%d", n)
            context.detach(token)
        seen.append(observe())
        return seen


    greenlets = [spawn(work, n) for n in range(50)]
    results = [result(g) for g in greenlets]
    wrong = sum(r != [(n + 1, {"request_id": f"g{n}"})] * 3 + [(None, {})] for n, r in enumerate(results))
    for line in stream.getvalue().splitlines():
        trace_id, request_id, message = line.split()
        n = int(message[1:])
        wrong += (trace_id, request_id) != (format(n + 1, "032x"), f"g{n}")
    with threadctx.bound(request_id="parent"):
        plain = result(spawn(observe))
        carried = result(spawn(threadctx.wrap_context(observe)))
    print(wrong, len(stream.getvalue().splitlines()), plain, carried, sep="|")
    """
)


#: A free-threaded build (3.13t, 3.14t), where some C extensions are not ready yet.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize(
    "library",
    [
        "gevent",
        pytest.param(
            "eventlet",
            marks=pytest.mark.skipif(
                FREE_THREADED,
                reason="eventlet crashes the interpreter by itself on a free-threaded build "
                "(seen on a 3.14t build, not threadctx's doing; issue 22)",
            ),
        ),
    ],
)
def test_greenlets_keep_their_own_context(library: str, order: str) -> None:
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, library, order],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    wrong, lines, plain, carried = result.stdout.strip().split("|")
    assert (wrong, lines) == ("0", "150"), "every observation and every line of every greenlet is its own"
    assert plain == "(None, {})", "a spawned greenlet starts clean"
    assert carried == "(None, {'request_id': 'parent'})", "unless the context is carried (wrap)"
