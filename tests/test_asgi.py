"""threadctx.asgi.ContextMiddleware: the ASGI contract, then FastAPI under a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap, set_global_textmap
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter, default_setter

import threadctx
from _servers import (
    LINE,
    Server,
    app_lines,
    clean_env,
    concurrent_requests,
    free_port,
    get,
    misattributed,
    python,
    running,
)
from threadctx.asgi import ContextMiddleware, ScopeGetter

Message = dict[str, Any]


def http_scope(*headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers],
    }


def call(middleware: ContextMiddleware, scope: dict[str, Any]) -> list[Message]:
    """One request through the middleware on a fresh event loop; the messages the app sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the correlation IDs it sees, as the body."""
    body = json.dumps(dict(threadctx.correlation())).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/json")]})
    await send({"type": "http.response.body", "body": body})


def test_binds_a_valid_request_id_echoes_it_and_restores_the_context() -> None:
    sent = call(ContextMiddleware(echo_app), http_scope(("X-Request-ID", "r-1"), ("baggage", "tenant=t")))
    start, body = sent
    assert (b"x-request-id", b"r-1") in start["headers"]
    assert json.loads(body["body"]) == {"request_id": "r-1"}, "tenant is not on the allowlist"
    assert threadctx.correlation() == {}


def test_an_invalid_or_missing_request_id_is_replaced_and_counted() -> None:
    before = threadctx.propagation_stats()["invalid_request_ids"]
    for headers in [
        (("X-Request-ID", "a b"),),
        (("X-Request-ID", "r-1"), ("X-Request-ID", "r-2")),  # two values: which one? neither
        (("baggage", "request_id=a%20b%3Bc%22%2C%3Cscript%3E"),),
    ]:
        start, body = call(ContextMiddleware(echo_app), http_scope(*headers))
        request_id = json.loads(body["body"])["request_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert (b"x-request-id", request_id.encode()) in start["headers"]
    assert threadctx.propagation_stats()["invalid_request_ids"] == before + 3
    start, _ = call(ContextMiddleware(echo_app), http_scope())
    assert re.fullmatch(rb"[0-9a-f]{32}", dict(start["headers"])[b"x-request-id"])


class MixedCaseHeaderPropagator(TextMapPropagator):
    """A propagator whose header name is not lowercase, as AWS X-Ray's ``X-Amzn-Trace-Id``."""

    HEADER = "X-Trace-Header"

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        values = getter.get(carrier, self.HEADER)
        if not values:
            return context
        trace_id, span_id = values[0].split("-")
        span = trace.NonRecordingSpan(trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True))
        return trace.set_span_in_context(span, context)

    def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
        raise NotImplementedError

    @property
    def fields(self) -> set[str]:
        return {self.HEADER}


def test_a_propagator_whose_header_name_has_capitals_is_read() -> None:
    """A trace in a header such as AWS X-Ray's ``X-Amzn-Trace-Id`` continues.

    ASGI header names are lowercase: the check for a propagation header compared them with the
    propagators' field names as given, and skipped extraction for every such request.
    """
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        await echo_app(scope, receive, send)

    saved = get_global_textmap()
    set_global_textmap(MixedCaseHeaderPropagator())
    try:
        call(ContextMiddleware(app), http_scope(("X-Trace-Header", f"{trace_id}-{span_id}")))
    finally:
        set_global_textmap(saved)
    assert seen == [trace_id]


@pytest.mark.parametrize(
    "extra",
    [[], [(b"Accept", b"*/*")], [(b"cookie", b"a=1"), (b"cookie", b"b=2")]],
    ids=["lowercase-names-once", "a-name-in-capitals", "a-name-twice"],
)
def test_every_form_of_the_header_list_is_read_alike(extra: list[tuple[bytes, bytes]]) -> None:
    """Headers as servers send them (lowercase, each once) are read as they are, others gathered first.

    A name in capitals or a name twice takes the second way; both read the same context and id.
    """
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        await echo_app(scope, receive, send)

    scope = http_scope(("traceparent", f"00-{trace_id}-{span_id}-01"), ("X-Request-ID", "r-7"))
    scope["headers"] += extra
    start, body = call(ContextMiddleware(app), scope)
    assert seen == [trace_id]
    assert json.loads(body["body"]) == {"request_id": "r-7"}
    assert (b"x-request-id", b"r-7") in start["headers"]


def test_a_response_that_sets_the_header_itself_keeps_it() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"X-Request-ID", b"own")]})
        await send({"type": "http.response.body", "body": b""})

    start, _ = call(ContextMiddleware(app), http_scope(("X-Request-ID", "r-1")))
    assert start["headers"] == [(b"X-Request-ID", b"own")]


def test_lifespan_passes_through_untouched() -> None:
    seen: list[tuple[dict[str, Any], object]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope, dict(threadctx.correlation())))
        await send({"type": "lifespan.startup.complete"})

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    sent = call(ContextMiddleware(app), scope)
    assert seen == [(scope, {})]
    assert sent == [{"type": "lifespan.startup.complete"}], "no header added, message not copied"


def test_a_websocket_gets_the_request_id_when_accepted() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": threadctx.correlation()["request_id"]})

    scope = http_scope(("X-Request-ID", "ws-1")) | {"type": "websocket"}
    accept, message = call(ContextMiddleware(app), scope)
    assert accept == {"type": "websocket.accept", "headers": [(b"x-request-id", b"ws-1")]}
    assert message["text"] == "ws-1"


def test_a_websocket_refused_with_an_http_response_gets_the_request_id() -> None:
    """The ASGI "websocket denial response" extension: the refusal is the response that has headers."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no"})

    scope = http_scope(("X-Request-ID", "ws-2")) | {"type": "websocket"}
    start, _ = call(ContextMiddleware(app), scope)
    assert start["headers"] == [(b"x-request-id", b"ws-2")]


def test_the_context_is_restored_when_the_app_raises() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise KeyError("handler failed")

    async def run() -> object:
        with pytest.raises(KeyError):
            await ContextMiddleware(app)(http_scope(("X-Request-ID", "r-1")), None, None)  # type: ignore[arg-type]
        return dict(threadctx.correlation())

    assert asyncio.run(run()) == {}


def test_a_wsgi_application_is_refused_when_the_middleware_is_created() -> None:
    """Issue 13.6: ContextMiddleware(FastAPI()) was accepted by the WSGI one; here the reverse."""

    def wsgi_app(environ: object, start_response: object) -> list[bytes]:
        return []

    with pytest.raises(TypeError, match=r"threadctx\.wsgi\.ContextMiddleware"):
        ContextMiddleware(wsgi_app)  # type: ignore[arg-type]


def test_wrapping_opentelemetry_warns_to_put_it_inside() -> None:
    asgi = pytest.importorskip("opentelemetry.instrumentation.asgi")
    fastapi_instrumentation = pytest.importorskip("opentelemetry.instrumentation.fastapi")
    FastAPI = pytest.importorskip("fastapi").FastAPI  # noqa: N806 - the class, under its own name

    with pytest.warns(UserWarning, match=r"OpenTelemetryMiddleware\(ContextMiddleware\(app\)\)"):
        ContextMiddleware(asgi.OpenTelemetryMiddleware(echo_app))
    app = FastAPI()
    fastapi_instrumentation.FastAPIInstrumentor.instrument_app(app)
    try:
        with pytest.warns(UserWarning, match=r"app\.add_middleware\(ContextMiddleware\)"):
            ContextMiddleware(app)
    finally:
        fastapi_instrumentation.FastAPIInstrumentor.uninstrument_app(app)


def test_the_scope_getter_reads_every_value_of_a_header_in_any_case() -> None:
    scope = http_scope(("Baggage", "a=1"), ("baggage", "b=2"), ("Traceparent", "x"))
    assert ScopeGetter().get(scope, "BAGGAGE") == ["a=1", "b=2"]
    assert ScopeGetter().get(scope, "tracestate") is None
    assert ScopeGetter().keys(scope) == ["baggage", "baggage", "traceparent"]


# --- FastAPI under uvicorn -----------------------------------------------------------------------

CLIENTS = 24
PER_CLIENT = 4
KINDS = ("async", "sync", "stream", "stream-sync")
LINES_PER_KIND = {"async": 3, "sync": 4, "stream": 2, "stream-sync": 2}


def kind_of(name: str) -> str:
    return KINDS[int(name[1:].split("-", maxsplit=1)[0]) % len(KINDS)]


@pytest.fixture
def uvicorn_app(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts examples/fastapi_app.py under uvicorn with the options given; stops it at the end."""
    pytest.importorskip("uvicorn", reason="the server tests run the real uvicorn (test group)")
    pytest.importorskip("fastapi", reason="the server tests serve a real FastAPI app (test group)")
    with ExitStack() as stack:

        def start(*options: str, **env: str) -> Server:
            port = free_port()
            command = python(
                "-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1", "--port", str(port), *options
            )
            spans = tmp_path / f"spans-{port}.jsonl"
            env = clean_env(OTEL_PYTHON_CONTEXT="threadctx", THREADCTX_EXAMPLE_SPANS=str(spans), **env)
            server = stack.enter_context(running(command, port, tmp_path / f"uvicorn-{port}.log", env))
            SPANS[server.port] = spans
            return server

        yield start


SPANS: dict[int, Path] = {}


def spans_of(server: Server) -> list[dict[str, Any]]:
    path = SPANS[server.port]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_fastapi_under_uvicorn_every_line_and_span_belongs_to_its_request(
    uvicorn_app: Callable[..., Server],
) -> None:
    """Issue 13.2: async and sync endpoints, dependencies, run_in_threadpool, background tasks, streaming."""
    server = uvicorn_app("--no-access-log")
    sent = concurrent_requests(server.port, lambda name: f"/{kind_of(name)}/{name}", CLIENTS, PER_CLIENT)
    output = server.stop()  # graceful: background tasks finish first
    for name, request in sent.items():
        assert (request.status, request.echoed) == (200, request.request_id), name
    lines = app_lines(output)
    assert len(lines) == sum(LINES_PER_KIND[kind_of(name)] for name in sent), output[-2000:]
    assert misattributed(lines, sent) == []
    spans = spans_of(server)
    by_id = {span["span_id"]: span for span in spans}

    def remote_parent(span: dict[str, Any]) -> str:
        while span["parent_id"] in by_id:
            span = by_id[span["parent_id"]]
        assert span["kind"] == "SERVER", "FastAPI's own SERVER span is the local root"
        return str(span["parent_id"])

    work = [span for span in spans if span["name"] == "work"]
    expected = sorted(
        (request.trace_id, request.span_id)
        for name, request in sent.items()
        if kind_of(name) in ("async", "sync")
    )
    assert sorted((span["trace_id"], remote_parent(span)) for span in work) == expected, (
        "each span started on a worker thread descends from its own request's remote parent"
    )


def test_hostile_headers_under_uvicorn(uvicorn_app: Callable[..., Server]) -> None:
    server = uvicorn_app("--no-access-log")
    for headers in (
        {"X-Request-ID": "a\tb"},
        {"baggage": "request_id=%E2%98%83"},
        {"baggage": "request_id=a%20b%3Bc%22%2C%3Cscript%3E"},
        {"X-Request-ID": "x" * 129, "traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},
    ):
        status, response, body = get(server.port, "/async/hostile", headers)
        assert status == 200
        assert re.fullmatch(r"[0-9a-f]{32}", response["x-request-id"])
        assert json.loads(body) == {"request_id": response["x-request-id"]}
    output = server.stop()
    assert "<script>" not in output
    for line in app_lines(output):
        assert line.isprintable()


def test_a_websocket_under_uvicorn_carries_its_request_id(uvicorn_app: Callable[..., Server]) -> None:
    from websockets.sync.client import connect

    server = uvicorn_app("--no-access-log")
    with connect(
        f"ws://127.0.0.1:{server.port}/ws/w1", additional_headers={"X-Request-ID": "ws-9"}
    ) as websocket:
        assert websocket.response is not None
        assert websocket.response.headers["x-request-id"] == "ws-9"
        websocket.send("hello")
        assert websocket.recv(timeout=30) == "ws-9"
    output = server.stop()
    (line,) = app_lines(output)
    assert LINE.match(line)["rid"] == "ws-9"  # type: ignore[index]


@pytest.mark.parametrize("with_traceparent", [True, False])
def test_beside_fastapi_instrumentor_the_server_span_and_the_ids_are_kept(
    uvicorn_app: Callable[..., Server], with_traceparent: bool
) -> None:
    """Issue 13.6: a SERVER span named after the route, its request id in every line, either way."""
    pytest.importorskip("opentelemetry.instrumentation.fastapi")
    server = uvicorn_app("--no-access-log", THREADCTX_EXAMPLE_INSTRUMENT="1")
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"X-Request-ID": "r-otel"}
    if with_traceparent:
        headers["traceparent"] = f"00-{trace_id}-{span_id}-01"
    status, response, _ = get(server.port, "/sync/n1", headers)
    assert (status, response["x-request-id"]) == (200, "r-otel")
    output = server.stop()
    spans = spans_of(server)
    (server_span,) = [span for span in spans if span["kind"] == "SERVER"]
    assert server_span["name"] == "GET /sync/{name}"
    if with_traceparent:
        assert (server_span["trace_id"], server_span["parent_id"]) == (trace_id, span_id)
    (work,) = [span for span in spans if span["name"] == "work"]
    assert work["parent_id"] == server_span["span_id"]
    lines = app_lines(output)
    assert len(lines) == 4
    for line in lines:
        match = LINE.match(line)
        assert match
        assert (match["trace"], match["rid"]) == (server_span["trace_id"], "r-otel"), line


def test_uvicorns_access_log_line_carries_the_request_id_and_trace_id(
    uvicorn_app: Callable[..., Server],
) -> None:
    """Issue 13.5: uvicorn writes it from send(), inside the request's context: the filter works."""
    server = uvicorn_app("--log-config", "uvicorn_logging.json")
    trace_id = secrets.token_hex(16)
    get(
        server.port,
        "/async/a1",
        {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "X-Request-ID": "r-log"},
    )
    output = server.stop()
    (access,) = [line for line in output.splitlines() if line.startswith("access ")]
    assert re.fullmatch(
        rf'access trace_id={trace_id} request_id=r-log 127\.0\.0\.1:\d+ - "GET /async/a1 HTTP/1\.1" 200',
        access,
    ), access


WSGI_INSIDE = """
from asgiref.wsgi import WsgiToAsgi

import threadctx
from threadctx.asgi import ContextMiddleware


def wsgi_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [threadctx.correlation()["request_id"].encode()]


app = ContextMiddleware(WsgiToAsgi(wsgi_app))
"""


def test_a_wsgi_app_inside_through_asgirefs_wsgi_to_asgi_under_uvicorn(tmp_path: Path) -> None:
    """WsgiToAsgi hands the middleware's send to AsyncToSync, which warns unless it is async."""
    pytest.importorskip("uvicorn", reason="the server tests run the real uvicorn (test group)")
    pytest.importorskip("asgiref.wsgi", reason="asgiref comes with Django (test group)")
    (tmp_path / "wsgi_inside.py").write_text(WSGI_INSIDE)
    port = free_port()
    command = python(
        *("-W", "error::UserWarning", "-m", "uvicorn", "wsgi_inside:app", "--app-dir", str(tmp_path)),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
    )
    with running(command, port, tmp_path / "uvicorn.log", clean_env()) as server:
        status, headers, body = get(port, "/", {"X-Request-ID": "r-wsgi"})
        output = server.stop()
    assert (status, headers.get("x-request-id"), body) == (200, "r-wsgi", b"r-wsgi"), output


@pytest.mark.parametrize("with_traceparent", [True, False])
def test_inside_opentelemetrys_asgi_middleware(
    tracer_provider: Any, exporter: Any, with_traceparent: bool
) -> None:
    """OpenTelemetryMiddleware(ContextMiddleware(app)): its SERVER span is kept, the ids bound under it."""
    asgi = pytest.importorskip("opentelemetry.instrumentation.asgi")
    seen: list[tuple[object, dict[str, str]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((trace.get_current_span(), dict(threadctx.correlation())))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    headers = [("X-Request-ID", "r-otel"), ("baggage", "tenant=t")]
    if with_traceparent:
        headers.append(("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    scope = http_scope(*headers) | {"scheme": "http", "server": ("127.0.0.1", 80), "query_string": b""}
    middleware = asgi.OpenTelemetryMiddleware(ContextMiddleware(app), tracer_provider=tracer_provider)
    sent = call(middleware, scope)
    assert (b"x-request-id", b"r-otel") in sent[0]["headers"]
    ((span, ids),) = seen
    assert ids == {"request_id": "r-otel"}
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert span.get_span_context().span_id == server.context.span_id
    if with_traceparent:
        assert format(server.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
