"""threadctx.grpc under a real grpc.server(ThreadPoolExecutor(8)) on 127.0.0.1, with concurrent clients.

The service is a generic handler with bytes in and out (no generated stubs): each method logs
through a handler with ContextFilter, and every line is checked against the call that caused it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

grpc = pytest.importorskip("grpc", reason="threadctx.grpc needs grpcio (the test group installs it)")

from opentelemetry import trace  # noqa: E402 - after the skip
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import threadctx  # noqa: E402
import threadctx.grpc  # noqa: E402
from _servers import Lines  # noqa: E402

SERVICE = "test.Echo"
THREADS = 8
ROUNDS = 2  # each client thread makes every kind of call this many times
HEX32 = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger("grpcapp")


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)


class Work:
    """The service's four methods; each logs every message it handles, tagged with the caller's key."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self.tracer = tracer

    def _handle(self, message: bytes) -> bytes:
        if self.tracer is not None:
            with self.tracer.start_as_current_span("work"):
                log.info("handled %s", message.decode())
        else:
            log.info("handled %s", message.decode())
        return message

    def unary(self, request: bytes, context: Any) -> bytes:
        return self._handle(request)

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(3):
            yield self._handle(request)

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        return b"|".join(self._handle(request) for request in requests)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield self._handle(request)


def handlers(work: Work) -> Any:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(work.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(work.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(work.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(work.bidi),
        },
    )


class PollingThread(grpc.ServerInterceptor):  # type: ignore[misc]
    """Outermost: records the thread that gRPC calls intercept_service on (its polling thread)."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        self.threads.add(threading.get_ident())
        return continuation(details)


@pytest.fixture
def serve() -> Iterator[Callable[..., int]]:
    """Start a real server on 127.0.0.1 with the given interceptors; returns its port."""
    servers: list[Any] = []
    pools: list[ThreadPoolExecutor] = []

    def start(work: Work, interceptors: list[Any]) -> int:
        pools.append(ThreadPoolExecutor(8))
        server = grpc.server(pools[-1], interceptors=interceptors)
        server.add_generic_rpc_handlers((handlers(work),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return int(port)

    yield start
    for server in servers:
        server.stop(None).wait()
    for pool in pools:  # gRPC leaves its executor to its owner
        pool.shutdown(wait=True)


def call(
    channel: Any, kind: str, key: str, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[list[bytes], dict[str, str]]:
    """One call of ``kind``; returns the responses and the initial metadata the server sent."""
    payload = key.encode()
    method = f"/{SERVICE}/{kind}"
    if kind == "Unary":
        response, rpc = channel.unary_unary(method).with_call(payload, metadata=metadata, timeout=30)
        return [response], dict(rpc.initial_metadata())
    if kind == "ClientStream":
        response, rpc = channel.stream_unary(method).with_call(
            iter([payload] * 3), metadata=metadata, timeout=30
        )
        return [response], dict(rpc.initial_metadata())
    if kind == "ServerStream":
        stream = channel.unary_stream(method)(payload, metadata=metadata, timeout=30)
    else:
        stream = channel.stream_stream(method)(iter([payload] * 3), metadata=metadata, timeout=30)
    responses = list(stream)
    return responses, dict(stream.initial_metadata())


KINDS = ("Unary", "ServerStream", "ClientStream", "Bidi")


@pytest.mark.parametrize("opentelemetry", ["alone", "opentelemetry-outside", "opentelemetry-inside"])
def test_concurrent_calls_of_every_kind_run_in_their_callers_context(
    serve: Callable[..., int],
    lines: Lines,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    opentelemetry: str,
) -> None:
    """8 client threads x every call kind, each in its own span with its own request id: no line strays."""
    polling = PollingThread()
    interceptors = [polling, threadctx.grpc.server_interceptor()]
    if opentelemetry != "alone":
        otel_grpc = pytest.importorskip("opentelemetry.instrumentation.grpc")
        theirs = otel_grpc.server_interceptor(tracer_provider=tracer_provider)
        interceptors.insert(1 if opentelemetry == "opentelemetry-outside" else 2, theirs)
    port = serve(Work(), interceptors)
    tracer = tracer_provider.get_tracer("client")
    sent: dict[str, tuple[str, str, str]] = {}  # key -> (trace id, span id, request id)
    echoed: dict[str, str] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def client(n: int) -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
                channel = grpc.intercept_channel(plain, threadctx.grpc.client_interceptor())
                barrier.wait()
                for round_ in range(ROUNDS):
                    for kind in KINDS:
                        key = f"c{n}-{round_}-{kind}"
                        with (
                            tracer.start_as_current_span(key) as span,
                            threadctx.bound(request_id=f"rid-{key}"),
                        ):
                            ids = span.get_span_context()
                            sent[key] = (f"{ids.trace_id:032x}", f"{ids.span_id:016x}", f"rid-{key}")
                            _, initial = call(channel, kind, key)
                        echoed[key] = initial["x-request-id"]
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures

    calls = THREADS * ROUNDS * len(KINDS)
    assert len(sent) == calls
    assert echoed == {key: rid for key, (_, _, rid) in sent.items()}
    parsed = lines.parsed()
    assert len(parsed) == calls * 3 - THREADS * ROUNDS * 2  # 3 lines a call, but 1 for a unary call
    # Under OpenTelemetry's interceptor a line's span is the call's SERVER span, child of the caller's.
    parents = {
        f"{span.context.span_id:016x}": f"{span.parent.span_id:016x}"
        for span in exporter.get_finished_spans()
        if span.kind is trace.SpanKind.SERVER and span.parent is not None
    }
    assert len(parents) == (0 if opentelemetry == "alone" else calls)

    def caller_span(span: str) -> str:
        return span if opentelemetry == "alone" else parents.get(span, "not in a SERVER span")

    misattributed = [
        line
        for line in parsed
        if (line["trace"], caller_span(line["span"]), line["rid"])
        != sent[line["message"].removeprefix("handled ")]
    ]
    assert misattributed == []
    assert len(lines.threads) > 1  # the pool's threads served them, concurrently

    # Nothing stays bound: not on the polling thread, not on the pool's threads.
    assert polling.threads
    left = [s for s in threadctx.snapshot() if s.correlation or s.trace_id]
    assert left == []


def test_a_call_without_a_request_id_gets_a_new_one_each_time(
    serve: Callable[..., int], lines: Lines
) -> None:
    port = serve(Work(), [threadctx.grpc.server_interceptor()])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        echoed = [call(channel, kind, "k")[1]["x-request-id"] for kind in KINDS]
    assert all(HEX32.fullmatch(rid) for rid in echoed), echoed
    assert len(set(echoed)) == len(KINDS)
    # Each call's lines carry the id it was sent back.
    assert [line["rid"] for line in lines.parsed()] == [echoed[0]] + [echoed[1]] * 3 + [echoed[2]] * 3 + [
        echoed[3]
    ] * 3


@pytest.mark.parametrize(
    "hostile",
    [
        ("x-request-id", "a b<script>"),
        ("x-request-id", "x" * 300),
        ("x-request-id", "-starts-with-a-dash"),
        ("x-request-id", "ok-1"),  # valid alone, but sent twice below: refused
    ],
)
def test_a_hostile_request_id_is_replaced_counted_and_never_echoed(
    serve: Callable[..., int], lines: Lines, hostile: tuple[str, str]
) -> None:
    port = serve(Work(), [threadctx.grpc.server_interceptor()])
    metadata = (hostile, hostile) if hostile[1] == "ok-1" else (hostile,)
    before = threadctx.propagation_stats()["invalid_request_ids"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, initial = call(channel, "Unary", "k", metadata)
    assert HEX32.fullmatch(initial["x-request-id"])
    assert threadctx.propagation_stats()["invalid_request_ids"] == before + 1
    assert [line["rid"] for line in lines.parsed()] == [initial["x-request-id"]]
    assert hostile[1] not in "\n".join(lines.lines)


def test_what_the_handler_sends_in_its_initial_metadata_is_kept(serve: Callable[..., int]) -> None:
    class Sends(Work):
        def unary(self, request: bytes, context: Any) -> bytes:
            context.send_initial_metadata(
                (("server", "mine"),) + ((("x-request-id", "own-1"),) if request == b"own" else ())
            )
            return request

        def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
            context.send_initial_metadata((("server", "mine"),))
            yield request

    port = serve(Sends(), [threadctx.grpc.server_interceptor()])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, initial = call(channel, "Unary", "k", (("x-request-id", "r-1"),))
        assert (initial["server"], initial["x-request-id"]) == ("mine", "r-1")
        _, initial = call(channel, "Unary", "own", (("x-request-id", "r-2"),))
        assert initial["x-request-id"] == "own-1"  # the handler's own, never overwritten
        _, initial = call(channel, "ServerStream", "k", (("x-request-id", "r-3"),))
        assert (initial["server"], initial["x-request-id"]) == ("mine", "r-3")


def test_options_are_the_http_middlewares(serve: Callable[..., int], lines: Lines) -> None:
    interceptor = threadctx.grpc.server_interceptor(
        header="X-Correlation-ID", name="correlation_id", generate=lambda: "gen-1", trust_incoming=False
    )
    port = serve(Work(), [interceptor])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, initial = call(channel, "Unary", "k", (("x-correlation-id", "mine"),))
    assert initial["x-correlation-id"] == "gen-1"
    assert "x-request-id" not in initial
    with pytest.raises(ValueError, match="header must be"):
        threadctx.grpc.server_interceptor(header="bad header")
    quiet = threadctx.grpc.server_interceptor(response_header=False)
    port = serve(Work(), [quiet])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, initial = call(channel, "Bidi", "k", (("x-request-id", "r-9"),))
    assert "x-request-id" not in initial
    assert lines.parsed()[-1]["rid"] == "r-9"


def test_an_aborted_call_still_echoes_its_request_id(serve: Callable[..., int]) -> None:
    class Aborts(Work):
        def unary(self, request: bytes, context: Any) -> bytes:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    port = serve(Aborts(), [threadctx.grpc.server_interceptor()])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as raised:
        call(channel, "Unary", "k", (("x-request-id", "r-1"),))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert dict(raised.value.initial_metadata())["x-request-id"] == "r-1"


@pytest.mark.parametrize("order", ["opentelemetry-outside", "opentelemetry-inside"])
def test_beside_opentelemetrys_server_interceptor_in_either_order(
    serve: Callable[..., int],
    lines: Lines,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    order: str,
) -> None:
    """The handler runs in OpenTelemetry's SERVER span, child of the caller's, with the request id."""
    otel_grpc = pytest.importorskip("opentelemetry.instrumentation.grpc")
    ours = threadctx.grpc.server_interceptor()
    theirs = otel_grpc.server_interceptor(tracer_provider=tracer_provider)
    interceptors = [theirs, ours] if order == "opentelemetry-outside" else [ours, theirs]
    port = serve(Work(tracer_provider.get_tracer("server")), interceptors)
    tracer = tracer_provider.get_tracer("client")
    callers: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        channel = grpc.intercept_channel(plain, threadctx.grpc.client_interceptor())
        for kind in KINDS:
            with (
                tracer.start_as_current_span(f"call {kind}") as span,
                threadctx.bound(request_id=f"rid-{kind}"),
            ):
                callers[kind] = span.get_span_context().span_id
                _, initial = call(channel, kind, kind)
            assert initial["x-request-id"] == f"rid-{kind}"

    spans = exporter.get_finished_spans()
    servers = {span.name.rsplit("/", 1)[1]: span for span in spans if span.kind is trace.SpanKind.SERVER}
    assert set(servers) == set(KINDS)
    for kind, server in servers.items():
        assert server.parent is not None
        assert server.parent.span_id == callers[kind]
        assert server.parent.is_remote
    works = [span for span in spans if span.name == "work"]
    server_ids = {server.context.span_id: kind for kind, server in servers.items()}
    assert len(works) == 10
    assert all(work.parent is not None and work.parent.span_id in server_ids for work in works)
    for line in lines.parsed():
        kind = line["message"].removeprefix("handled ")
        assert line["rid"] == f"rid-{kind}"
        assert int(line["span"], 16) in {work.context.span_id for work in works}
        work = next(work for work in works if work.context.span_id == int(line["span"], 16))
        assert work.parent is not None
        assert server_ids[work.parent.span_id] == kind


def test_the_client_interceptor_never_replaces_what_the_caller_sent(
    serve: Callable[..., int], lines: Lines
) -> None:
    port = serve(Work(), [threadctx.grpc.server_interceptor()])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        channel = grpc.intercept_channel(plain, threadctx.grpc.client_interceptor())
        with threadctx.bound(request_id="bound-1"):
            _, initial = call(channel, "Unary", "k", (("x-request-id", "explicit-1"),))
        assert initial["x-request-id"] == "explicit-1"
        with threadctx.bound(request_id="not valid here"):  # a valid correlation ID, not a valid request id
            _, initial = call(channel, "Unary", "k")
        assert HEX32.fullmatch(initial["x-request-id"])
        assert "not valid here" not in initial.values()


def test_the_module_names_its_extra_when_grpcio_is_missing() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['grpc'] = None; import threadctx.grpc"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "pip install 'threadctx[grpc]'" in result.stderr


class Opaque(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps each unary handler in a callable object that claims to be from OpenTelemetry's module."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        return grpc.unary_unary_rpc_method_handler(OpaqueBehavior(handler.unary_unary))


class OpaqueBehavior:
    __module__ = "opentelemetry.instrumentation.grpc._server"

    def __init__(self, inner: Callable[[bytes, Any], bytes]) -> None:
        self.inner = inner

    def __call__(self, request: bytes, context: Any) -> bytes:
        return self.inner(request, context)


def test_an_unknown_opentelemetry_wrapper_shape_warns_once_and_still_serves(
    serve: Callable[..., int], lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If opentelemetry-instrumentation-grpc changes how it wraps handlers, calls are still served."""
    monkeypatch.setattr(threadctx.grpc, "_outside_warned", False)
    ours = threadctx.grpc.server_interceptor()
    opaque = grpc.unary_unary_rpc_method_handler(OpaqueBehavior(Work().unary))
    # Here, on this thread: on the server, intercept_service runs on gRPC's polling thread.
    with pytest.warns(UserWarning, match="list it after OpenTelemetry's"):
        assert ours.intercept_service(lambda details: opaque, None) is not None
    port = serve(Work(), [ours, Opaque()])  # warned once: not again
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, initial = call(channel, "Unary", "k", (("x-request-id", "r-1"),))
        _, again = call(channel, "Unary", "k", (("x-request-id", "r-2"),))
    assert (initial["x-request-id"], again["x-request-id"]) == ("r-1", "r-2")
    assert [line["rid"] for line in lines.parsed()] == ["r-1", "r-2"]


def test_an_abandoned_stream_cleans_up_in_its_callers_context(
    serve: Callable[..., int], lines: Lines
) -> None:
    """A client cancels a response stream: the handler's ``finally`` still logs with the call's request id."""
    cleaned = threading.Event()

    class Endless(Work):
        def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
            try:
                while True:
                    yield self._handle(request)
            finally:
                log.info("cleanup %s", request.decode())
                cleaned.set()

    port = serve(Endless(), [threadctx.grpc.server_interceptor()])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(
            b"k", metadata=(("x-request-id", "req-abandoned"),), timeout=30
        )
        assert next(stream) == b"k"
        stream.cancel()
        assert cleaned.wait(30), "gRPC closed the abandoned stream"
    (cleanup,) = [line for line in lines.parsed() if line["message"].startswith("cleanup")]
    assert cleanup["rid"] == "req-abandoned"


@pytest.mark.parametrize(
    "header", ["X Request", "x-request-id\r\nx-forged", "", "baggage", "Traceparent", "grpc-status"]
)
def test_a_header_that_would_break_or_replace_metadata_is_refused(header: str) -> None:
    """A careless option fails at start-up, not on every call (or by replacing the baggage it sends)."""
    with pytest.raises(ValueError, match="header"):
        threadctx.grpc.client_interceptor(header=header)
    with pytest.raises(ValueError, match="header"):
        threadctx.grpc.server_interceptor(header=header)
    with pytest.raises(ValueError, match="identifier"):
        threadctx.grpc.client_interceptor(name="request-id")


def test_the_client_interceptor_beside_the_propagators_request_id_header_sends_it_once(
    serve: Callable[..., int], lines: Lines
) -> None:
    """With CorrelationPropagator(request_id_header=...) configured too, the server still gets one id."""
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    received: list[tuple[str, str]] = []

    class Recording(Work):
        def unary(self, request: bytes, context: Any) -> bytes:
            received.extend(
                (key, value) for key, value in context.invocation_metadata() if key == "x-request-id"
            )
            return super().unary(request, context)

    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(
        CompositePropagator(
            [
                TraceContextTextMapPropagator(),
                threadctx.CorrelationPropagator(request_id_header="X-Request-ID"),
            ]
        )
    )
    try:
        port = serve(Recording(), [threadctx.grpc.server_interceptor()])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            channel = grpc.intercept_channel(plain, threadctx.grpc.client_interceptor())
            with threadctx.bound(request_id="bound-once"):
                _, initial = call(channel, "Unary", "k")
    finally:
        propagate.set_global_textmap(saved)
    assert received == [("x-request-id", "bound-once")]
    assert initial["x-request-id"] == "bound-once"
    assert [line["rid"] for line in lines.parsed()] == ["bound-once"]
