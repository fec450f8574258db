"""ContextMiddleware under a real threaded WSGI server (waitress) on 127.0.0.1, with real HTTP clients."""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import threadctx
import threadctx._requests
from _servers import Lines, get, waitress_servers
from threadctx.wsgi import ContextMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

JOIN = 60
CLIENTS = 32
REQUESTS_PER_CLIENT = 4
LINE = re.compile(r"trace=(?P<trace>\w+) span=(?P<span>\w+) request_id=(?P<rid>\S+) (?P<message>.*)$")


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    log = logging.getLogger("app")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)


@pytest.fixture
def serve() -> Iterator[Callable[[WSGIApplication], int]]:
    """Start waitress with 8 threads on a free port of 127.0.0.1; return the port."""
    with waitress_servers(JOIN) as start:
        yield start


def state() -> tuple[bool, dict[str, str]]:
    return trace.get_current_span().get_span_context().is_valid, dict(threadctx.correlation())


def handler_app(pool: threadctx.ContextThreadPoolExecutor, after: list[object]) -> WSGIApplication:
    """Logs in the handler, in a pool task and while streaming the body; records the worker's state after."""
    log = logging.getLogger("app")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        name = environ["PATH_INFO"].strip("/")
        log.info("handling %s", name)
        pool.submit(log.info, "pool task for %s", name).result(JOIN)
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            log.info("streaming %s", name)
            yield name.encode()

        return body()

    wrapped = ContextMiddleware(app)

    def recorder(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = b"".join(wrapped(environ, start_response))
        after.append(state())
        return [body]

    return recorder


def test_every_line_of_many_concurrent_requests_carries_its_own_ids(
    serve: Callable[[WSGIApplication], int], lines: Lines
) -> None:
    after: list[object] = []
    with threadctx.ContextThreadPoolExecutor(max_workers=4) as pool:
        port = serve(handler_app(pool, after))
        sent: dict[str, tuple[str, str]] = {}
        received: dict[str, tuple[int, str | None, bytes]] = {}
        barrier = threading.Barrier(CLIENTS)
        lock = threading.Lock()

        def client(index: int) -> None:
            barrier.wait(JOIN)
            for n in range(REQUESTS_PER_CLIENT):
                name = f"c{index}-{n}"
                trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
                with lock:
                    sent[name] = (trace_id, span_id)
                status, headers, body = get(
                    port,
                    f"/{name}",
                    {"traceparent": f"00-{trace_id}-{span_id}-01", "X-Request-ID": f"req-{name}"},
                )
                with lock:
                    received[name] = (status, headers.get("x-request-id"), body)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)

    total = CLIENTS * REQUESTS_PER_CLIENT
    assert received == {name: (200, f"req-{name}", name.encode()) for name in sent}
    assert len(received) == total
    assert len(lines.lines) == 3 * total
    wrong = []
    for line in lines.lines:
        match = LINE.match(line)
        assert match, line
        name = match["message"].rsplit(" ", 1)[1]
        if (match["trace"], match["span"], match["rid"]) != (*sent[name], f"req-{name}"):
            wrong.append(line)
    assert wrong == []
    assert after == [(False, {})] * total, "each worker thread is clean after its request"


def run_once(
    serve: Callable[[WSGIApplication], int], headers: dict[str, str], **options: object
) -> tuple[dict[str, str], dict[str, str]]:
    """One request through ContextMiddleware: the response headers and the IDs the app saw."""
    seen: dict[str, str] = {}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.update(threadctx.correlation())
        start_response("200 OK", [])
        return [b""]

    port = serve(ContextMiddleware(app, **options))  # type: ignore[arg-type]
    status, response_headers, _ = get(port, "/", headers)
    assert status == 200
    return response_headers, seen


@pytest.mark.parametrize(
    "incoming",
    [
        "has space",
        "x" * 129,
        "-starts-with-dash",
        "a\tb",
        "\u00e9t\u00e9",
        "trace=forged,x",
    ],
)
def test_an_invalid_request_id_is_replaced_counted_and_never_logged(
    serve: Callable[[WSGIApplication], int], incoming: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = threadctx.propagation_stats()["invalid_request_ids"]
    with caplog.at_level(logging.DEBUG):
        headers, seen = run_once(serve, {"X-Request-ID": incoming})
    assert re.fullmatch(r"[0-9a-f]{32}", seen["request_id"]), seen
    assert headers["x-request-id"] == seen["request_id"]
    assert threadctx.propagation_stats()["invalid_request_ids"] == before + 1
    assert incoming not in caplog.text


def test_a_request_without_an_id_gets_a_new_one_each_time(serve: Callable[[WSGIApplication], int]) -> None:
    first, _ = run_once(serve, {})
    second, _ = run_once(serve, {})
    assert re.fullmatch(r"[0-9a-f]{32}", first["x-request-id"])
    assert first["x-request-id"] != second["x-request-id"]


def test_header_name_correlation_name_and_generator_are_configurable(
    serve: Callable[[WSGIApplication], int],
) -> None:
    headers, seen = run_once(
        serve, {"X-Correlation-ID": "abc-1"}, header="X-Correlation-ID", name="correlation_id"
    )
    assert seen == {"correlation_id": "abc-1"}
    assert headers["x-correlation-id"] == "abc-1"
    headers, seen = run_once(
        serve, {"X-Request-ID": "abc-2"}, trust_incoming=False, generate=lambda: "mine", response_header=False
    )
    assert seen == {"request_id": "mine"}
    assert "x-request-id" not in headers


def test_bad_options_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="HTTP header name"):
        ContextMiddleware(lambda environ, start_response: [], header="X Request\nID")
    with pytest.raises(ValueError, match="ASCII identifier"):
        ContextMiddleware(lambda environ, start_response: [], name="request-id")


def test_wrapping_opentelemetrys_middleware_warns_to_put_it_inside() -> None:
    wsgi_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.wsgi", reason="opentelemetry-instrumentation-wsgi is not installed"
    )
    inner = wsgi_instrumentation.OpenTelemetryMiddleware(lambda environ, start_response: [])
    with pytest.warns(UserWarning, match=r"OpenTelemetryMiddleware\(ContextMiddleware\(app\)\)"):
        ContextMiddleware(inner)


def test_inside_opentelemetrys_wsgi_middleware(
    serve: Callable[[WSGIApplication], int],
    lines: Lines,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    """OpenTelemetry starts the server span from the headers; the lines carry it and the request id."""
    wsgi_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.wsgi", reason="opentelemetry-instrumentation-wsgi is not installed"
    )
    log = logging.getLogger("app")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        log.info("inside")
        start_response("200 OK", [])
        return [b"ok"]

    middleware = wsgi_instrumentation.OpenTelemetryMiddleware(
        ContextMiddleware(app), tracer_provider=tracer_provider
    )
    port = serve(middleware)
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    status, headers, _ = get(
        port, "/", {"traceparent": f"00-{trace_id}-{span_id}-01", "X-Request-ID": "r-otel", "baggage": "k=v"}
    )
    assert status == 200
    assert headers["x-request-id"] == "r-otel"
    (server_span,) = exporter.get_finished_spans()
    assert server_span.kind == trace.SpanKind.SERVER
    assert server_span.parent is not None
    assert format(server_span.parent.span_id, "016x") == span_id
    assert lines.lines == [
        f"trace={trace_id} span={server_span.context.span_id:016x} request_id=r-otel inside"
    ]


@pytest.mark.parametrize("probe", ["baggage key", "public call"])
def test_baggage_that_opentelemetrys_middleware_extracted_gives_the_request_id(
    serve: Callable[[WSGIApplication], int],
    lines: Lines,
    tracer_provider: TracerProvider,
    monkeypatch: pytest.MonkeyPatch,
    probe: str,
) -> None:
    """The baggage OpenTelemetry read is found by its context key, or by baggage.get_all() without it."""
    wsgi_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.wsgi", reason="opentelemetry-instrumentation-wsgi is not installed"
    )
    if probe == "public call":  # what an opentelemetry-api without the private key gets
        monkeypatch.setattr(threadctx._requests, "_BAGGAGE_KEY", "")
    else:  # the probe found the key the baggage API writes under
        assert baggage.set_baggage("k", "v").get(threadctx._requests._BAGGAGE_KEY) == {"k": "v"}
    log = logging.getLogger("app")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        log.info("inside")
        start_response("200 OK", [])
        return [b"ok"]

    port = serve(
        wsgi_instrumentation.OpenTelemetryMiddleware(ContextMiddleware(app), tracer_provider=tracer_provider)
    )
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    status, headers, _ = get(
        port, "/", {"traceparent": f"00-{trace_id}-{span_id}-01", "baggage": "request_id=r-from-baggage"}
    )
    assert (status, headers["x-request-id"]) == (200, "r-from-baggage")
    assert lines.lines[0].endswith("request_id=r-from-baggage inside")


def test_a_generated_request_id_is_a_random_uuid4_in_hex() -> None:
    """What uuid4().hex gives, so that a service behind us with a UUID4 validator keeps it."""
    made = {threadctx.wsgi.new_request_id() for _ in range(2000)}
    assert len(made) == 2000
    for request_id in made:
        parsed = uuid.UUID(hex=request_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (request_id, 4, uuid.RFC_4122)


def test_generated_request_ids_are_unique_across_threads() -> None:
    """Ids are made ahead in batches: each is handed out once, whichever threads ask at the same time."""
    threads, each = 8, 1000
    barrier = threading.Barrier(threads)
    made: list[list[str]] = [[] for _ in range(threads)]

    def make(out: list[str]) -> None:
        barrier.wait(JOIN)
        out.extend(threadctx.wsgi.new_request_id() for _ in range(each))

    workers = [threading.Thread(target=make, args=(out,)) for out in made]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOIN)
    assert len({request_id for out in made for request_id in out}) == threads * each


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_hands_out_its_parents_next_request_ids() -> None:
    threadctx.wsgi.new_request_id()  # a batch is made: the rest of it waits in the parent
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only writes
        pid = os.fork()
    if pid == 0:
        try:
            os.write(write, " ".join(threadctx.wsgi.new_request_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {threadctx.wsgi.new_request_id() for _ in range(8)}
    assert len(child) == 8
    assert not child & parent


@pytest.mark.parametrize(
    "baggage",
    ["request_id=%E2%98%83", "request_id=a%20b%3Bc%22%2C%3Cscript%3E", "request_id=" + "x" * 200],
    ids=["non-latin-1", "header-injection", "too-long"],
)
def test_a_request_id_from_baggage_passes_the_request_id_rule_before_it_is_echoed(
    serve: Callable[[WSGIApplication], int], baggage: str
) -> None:
    """Issue 11.1: such baggage gave an HTTP 500 (waitress) or came back verbatim in X-Request-ID."""
    before = threadctx.propagation_stats()["invalid_request_ids"]
    headers, seen = run_once(serve, {"baggage": baggage})
    assert re.fullmatch(r"[0-9a-f]{32}", seen["request_id"]), seen
    assert headers["x-request-id"] == seen["request_id"]
    assert threadctx.propagation_stats()["invalid_request_ids"] == before + 1
    headers, seen = run_once(serve, {"baggage": "request_id=r-from-caller"})
    assert headers["x-request-id"] == seen["request_id"] == "r-from-caller", "a valid one is still taken"


def test_with_baggage_off_the_app_forwards_no_client_baggage(serve: Callable[[WSGIApplication], int]) -> None:
    """Issue 11.2: with OTEL_PROPAGATORS=tracecontext the middleware forwarded every client's baggage."""
    sent: list[dict[str, str]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sent.append(threadctx.inject({}))
        start_response("200 OK", [])
        return [b""]

    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    try:
        port = serve(ContextMiddleware(app))
        status, _, _ = get(port, "/", {"baggage": "session_token=abc", "X-Request-ID": "r-1"})
    finally:
        propagate.set_global_textmap(saved)
    assert status == 200
    assert sent == [{"baggage": "request_id=r-1"}]


def test_what_a_streamed_body_binds_stays_bound_for_its_next_chunks(
    serve: Callable[[WSGIApplication], int],
) -> None:
    """A body that binds an ID keeps it in its later steps, as a generator does anywhere else.

    Each step used to start again from the request's context: ``user`` bound before the first
    chunk was gone for the second.
    """
    seen: list[dict[str, str]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        threadctx.bind(user="u-1")
        yield b"a"
        seen.append(dict(threadctx.correlation()))
        yield b"b"

    port = serve(ContextMiddleware(app))
    status, headers, body = get(port, "/", {"X-Request-ID": "r-b"})
    assert (status, headers["x-request-id"], body) == (200, "r-b", b"ab")
    assert seen == [{"request_id": "r-b", "user": "u-1"}]


def test_a_generator_that_makes_an_invalid_id_is_an_error_not_a_header() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise AssertionError("not reached")

    middleware = ContextMiddleware(app, generate=lambda: "a b\r\nX: y")
    with pytest.raises(ValueError, match="invalid request id"):
        middleware({}, lambda status, headers, exc_info=None: lambda data: None)


def test_an_asgi_application_is_refused_when_the_middleware_is_created() -> None:
    """Issue 13.6: it was accepted, and every request then failed."""

    async def asgi_app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not reached")

    class AsgiApp:
        async def __call__(self, scope: object, receive: object, send: object) -> None:
            raise AssertionError("not reached")

    for app in (asgi_app, AsgiApp()):
        with pytest.raises(TypeError, match=r"threadctx\.asgi\.ContextMiddleware"):
            ContextMiddleware(app)  # type: ignore[arg-type]


def test_a_file_wrapper_body_reaches_the_server_unwrapped(
    serve: Callable[[WSGIApplication], int], tmp_path: Path
) -> None:
    """Issue 13.6: it was wrapped, so waitress could no longer send it as a file."""
    path = tmp_path / "payload.bin"
    path.write_bytes(b"x" * 100_000)
    returned: list[object] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(path.stat().st_size))])
        return environ["wsgi.file_wrapper"](path.open("rb"), 8192)  # type: ignore[no-any-return]

    middleware = ContextMiddleware(app)

    def recorder(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = middleware(environ, start_response)
        returned.append((body, environ["wsgi.file_wrapper"]))
        return body

    status, headers, body = get(serve(recorder), "/", {"X-Request-ID": "r-file"})
    assert (status, headers["x-request-id"], body) == (200, "r-file", path.read_bytes())
    ((body_object, file_wrapper),) = returned
    assert type(body_object) is file_wrapper, "the server's own file wrapper, not threadctx's _Body"


def test_waitress_access_lines_carry_the_request_id_and_trace_id(
    serve: Callable[[WSGIApplication], int],
) -> None:
    """Issue 13.5: waitress has no access log; TransLogger inside the middleware writes one in context."""
    translogger = pytest.importorskip("paste.translogger", reason="paste is in the test group")
    handler = Lines()
    handler.setFormatter(logging.Formatter("access trace=%(trace_id)s request_id=%(request_id)s %(message)s"))
    access = logging.getLogger("waitress.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    logged = translogger.TransLogger(app, logger_name="waitress.access", setup_console_handler=False)
    try:
        port = serve(ContextMiddleware(logged))
        trace_id = secrets.token_hex(16)
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        status, _, _ = get(port, "/orders?x=1", {"traceparent": traceparent, "X-Request-ID": "r-acc"})
    finally:
        access.removeHandler(handler)
    assert status == 200
    (line,) = handler.lines
    assert re.match(
        rf'access trace={trace_id} request_id=r-acc 127\.0\.0\.1 - - \[.*\] "GET /orders\?x=1 ', line
    )
