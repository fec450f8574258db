"""CorrelationPropagator: beside inject()/extract(), from OTEL_PROPAGATORS, through real instrumentations.

The client instrumentations are OpenTelemetry's own (requests, httpx sync and async); the second
service is a real waitress server on 127.0.0.1 with threadctx's WSGI middleware.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import threadctx
from _servers import LINE, Lines, get, waitress_servers
from threadctx._propagator import REQUEST_ID_HEADER_ENV
from threadctx.wsgi import ContextMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

EXAMPLES = int(os.environ.get("THREADCTX_FUZZ_EXAMPLES", "300"))
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
CLIENTS = 8
PER_CLIENT = 4

TEXTMAPS: dict[str, Callable[[], CompositePropagator]] = {
    "baggage": lambda: CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]),
    "threadctx": lambda: CompositePropagator(
        [TraceContextTextMapPropagator(), threadctx.CorrelationPropagator(request_id_header=None)]
    ),
}


@contextmanager
def global_textmap(textmap: CompositePropagator) -> Iterator[None]:
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(textmap)
    try:
        yield
    finally:
        propagate.set_global_textmap(saved)


def seen(context: Context) -> tuple[dict[str, object], dict[str, str], SpanContext]:
    """What a context carries: baggage, correlation IDs, span context."""
    return (
        dict(baggage.get_all(context)),
        dict(threadctx.correlation(context)),
        trace.get_current_span(context).get_span_context(),
    )


def counted(
    read: Callable[[], Context],
) -> tuple[tuple[dict[str, object], dict[str, str], SpanContext], dict[str, int]]:
    """What ``read()`` returns, and what it added to propagation_stats()."""
    before = threadctx.propagation_stats()
    result = seen(read())
    after = threadctx.propagation_stats()
    return result, {key: after[key] - before[key] for key in after}


# ---- one code path: the same result, side by side --------------------------------------------

member = st.one_of(
    st.builds(lambda value: f"request_id={value}", st.text(max_size=40)),
    st.builds(lambda value: f"tenant={value}", st.from_regex(r"[A-Za-z0-9%_.-]{0,20}", fullmatch=True)),
    st.builds(
        lambda name, value: f"{name}={value}", st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text()
    ),
    st.text(max_size=30),
)
baggage_headers = st.one_of(
    st.builds(",".join, st.lists(member, max_size=80)),
    st.builds(lambda n: ",".join(f"m{i}={'x' * 200}" for i in range(n)), st.integers(0, 70)),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=baggage_headers, extra=st.lists(st.sampled_from(["tenant", "user", "m3"]), max_size=3))
@example(header="request_id=r-1,session=abc,tenant=acme,user=%0Aforged", extra=["tenant", "user"])
@example(header="request_id=a%20b;p=1,request_id=two," + ",".join(f"m{i}=v" for i in range(70)), extra=[])
def test_extract_is_the_propagators_extract(header: str, extra: list[str]) -> None:
    """Same baggage, IDs, span and counts: extract() under ``baggage`` or ``threadctx``, the propagator."""
    threadctx.allow_propagation(*extra)
    carrier = {"traceparent": VALID, "baggage": header}
    propagator = threadctx.CorrelationPropagator(request_id_header=None)
    with global_textmap(TEXTMAPS["baggage"]()):
        reference = counted(lambda: threadctx.extract(carrier, context=Context()))
        assert (
            counted(lambda: threadctx.extract(carrier, context=Context(), trace=False))[0][:2]
            == reference[0][:2]
        )
    with global_textmap(TEXTMAPS["threadctx"]()):
        assert counted(lambda: threadctx.extract(carrier, context=Context())) == reference
        assert counted(lambda: propagate.extract(carrier, context=Context())) == reference
    alone, counts = counted(lambda: propagator.extract(carrier, Context()))
    assert (alone[:2], counts) == (reference[0][:2], reference[1])
    ids = reference[0][1]
    assert set(ids) <= threadctx.propagation_allowlist(), "an ID off the allowlist was bound"
    for name, value in ids.items():
        threadctx._correlation.validate(name, value)
    assert len(reference[0][0]) + len(ids) <= threadctx.BAGGAGE_MAX_MEMBERS


names = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
values = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=30)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    ids=st.dictionaries(st.one_of(st.just("request_id"), names), values, max_size=5),
    entries=st.dictionaries(st.one_of(st.just("request_id"), names), values, max_size=5),
    extra=st.lists(names, max_size=3),
)
@example(
    ids={"request_id": "r-1", "secret": "s"}, entries={"request_id": "theirs", "other": "kept"}, extra=[]
)
def test_inject_is_the_propagators_inject(
    ids: dict[str, str], entries: dict[str, str], extra: list[str]
) -> None:
    """Same headers: inject() under ``baggage`` and ``threadctx``, OpenTelemetry's inject, the propagator."""
    threadctx.allow_propagation(*extra)
    span = NonRecordingSpan(SpanContext(int(TRACE_ID, 16), 0xF067AA0BA902B7, True, TraceFlags(1)))
    context = trace.set_span_in_context(span, Context())
    for name, value in entries.items():
        context = baggage.set_baggage(name, value, context)
    token = otel_context.attach(context)
    try:
        with threadctx.bound(**ids):
            current = otel_context.get_current()
            with global_textmap(TEXTMAPS["baggage"]()):
                reference = threadctx.inject({})
            with global_textmap(TEXTMAPS["threadctx"]()):
                assert threadctx.inject({}) == reference
                otel: dict[str, str] = {}
                propagate.inject(otel)
                assert otel == reference
            alone: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(alone, current)
            threadctx.CorrelationPropagator(request_id_header=None).inject(alone, current)
            assert alone == reference
    finally:
        otel_context.detach(token)
    sent = dict(baggage.get_all(W3CBaggagePropagator().extract(reference, Context())))
    allowed = {name: value for name, value in ids.items() if name in threadctx.propagation_allowlist()}
    others = {name: value for name, value in entries.items() if name not in allowed}
    assert sent == {**others, **allowed}, "baggage of others kept, allowlisted IDs added, nothing else"


# ---- the request-id header option -------------------------------------------------------------


def test_the_request_id_header_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUEST_ID_HEADER_ENV, raising=False)
    propagator = threadctx.CorrelationPropagator()
    assert propagator.request_id_header is None
    assert propagator.fields == {"baggage"}
    carrier: dict[str, str] = {}
    with threadctx.bound(request_id="r-1"):
        propagator.inject(carrier)
    assert carrier == {"baggage": "request_id=r-1"}


def test_the_request_id_header_from_the_argument_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUEST_ID_HEADER_ENV, "X-Request-ID")
    assert threadctx.CorrelationPropagator().request_id_header == "X-Request-ID"
    assert threadctx.CorrelationPropagator(request_id_header=None).request_id_header is None, (
        "the argument wins"
    )
    propagator = threadctx.CorrelationPropagator(request_id_header="X-Correlation-ID")
    assert propagator.fields == {"baggage", "X-Correlation-ID"}
    carrier: dict[str, str] = {}
    with threadctx.bound(request_id="r-2"):
        propagator.inject(carrier)
    assert carrier == {"baggage": "request_id=r-2", "X-Correlation-ID": "r-2"}
    for header in ("X Request", "X-Request-ID\r\nX-Forged: 1", ""):
        with pytest.raises(ValueError, match="HTTP header name"):
            threadctx.CorrelationPropagator(request_id_header=header)
    for header in ("baggage", "Traceparent", "TRACESTATE"):  # the request id would replace that header
        with pytest.raises(ValueError, match="would replace the W3C header"):
            threadctx.CorrelationPropagator(request_id_header=header)


def test_the_request_id_header_carries_only_a_valid_allowlisted_request_id() -> None:
    """A value failing the middlewares' request-id rule goes in baggage only (encoded), not in the header."""
    propagator = threadctx.CorrelationPropagator(request_id_header="X-Request-ID")
    carrier: dict[str, str] = {}
    with threadctx.bound(request_id="a b;c"):
        propagator.inject(carrier)
    assert carrier == {"baggage": "request_id=a+b%3Bc"}
    threadctx.set_propagation_allowlist({"tenant"})  # an operator's list without request_id
    carrier = {}
    with threadctx.bound(request_id="r-3", tenant="acme"):
        propagator.inject(carrier)
    assert carrier == {"baggage": "tenant=acme"}, "the operator did not let request_id out"


def test_baggage_after_it_replaces_the_header_and_it_warns_once() -> None:
    """OTEL_PROPAGATORS=tracecontext,threadctx,baggage: the baggage propagator writes last, without IDs."""
    misordered = CompositePropagator(
        [
            TraceContextTextMapPropagator(),
            threadctx.CorrelationPropagator(request_id_header=None),
            W3CBaggagePropagator(),
        ]
    )
    token = otel_context.attach(baggage.set_baggage("other_tool", "kept"))
    try:
        with global_textmap(misordered), threadctx.bound(request_id="r-1"):
            headers: dict[str, str] = {}
            with pytest.warns(RuntimeWarning, match="OTEL_PROPAGATORS=tracecontext,threadctx"):
                propagate.inject(headers)
            assert headers["baggage"] == "other_tool=kept", "what the warning is about"
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                propagate.inject({})  # once per configured propagator
        with global_textmap(TEXTMAPS["threadctx"]()), threadctx.bound(request_id="r-1"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # in place of baggage: nothing to say
                headers = {}
                propagate.inject(headers)
            assert headers["baggage"] == "request_id=r-1,other_tool=kept"
    finally:
        otel_context.detach(token)


@pytest.mark.parametrize("layout", ["another-instance-injects-first", "nested-composite"])
def test_it_warns_whichever_instance_injects_first_and_in_a_nested_composite(layout: str) -> None:
    """The check is of the global propagator: a Celery hook's own instance may inject before it runs."""
    ours = threadctx.CorrelationPropagator(request_id_header=None)
    if layout == "nested-composite":
        inner = CompositePropagator([TraceContextTextMapPropagator(), ours])
        misordered = CompositePropagator([inner, W3CBaggagePropagator()])
    else:
        misordered = CompositePropagator([TraceContextTextMapPropagator(), ours, W3CBaggagePropagator()])
    standalone = layout != "nested-composite"
    first = threadctx.CorrelationPropagator(request_id_header=None) if standalone else propagate
    with global_textmap(misordered), pytest.warns(RuntimeWarning, match="OTEL_PROPAGATORS"):
        first.inject({})


# ---- OTEL_PROPAGATORS, resolved by OpenTelemetry itself -----------------------------------------

PROGRAM = """
import sys
exec(sys.argv[1])  # what the application imports first
from opentelemetry import baggage, context, propagate
import threadctx

print(type(context._RUNTIME_CONTEXT).__name__)
print(propagate.get_global_textmap()._propagators)
context.attach(baggage.set_baggage("other_tool", "kept"))
with threadctx.bound(request_id="r-1", secret="s3cr3t"):
    headers = {}
    propagate.inject(headers)
print(sorted(headers.items()))
incoming = propagate.extract({"baggage": "request_id=r-2,session=abc,secret=x"})
print(dict(baggage.get_all(incoming)), dict(threadctx.correlation(incoming)))
"""


#: What an application imports first: OpenTelemetry's propagate module imports threadctx's propagator.
FIRST = {
    "otel-first": "",
    "threadctx-first": "import threadctx",
    "wsgi-first": "from threadctx.wsgi import ContextMiddleware",
    "asgi-first": "from threadctx.asgi import ContextMiddleware",
    "propagator-first": "from threadctx import CorrelationPropagator",
    "inject-first": "from threadctx import inject",
}


@pytest.mark.parametrize("order", list(FIRST))
@pytest.mark.parametrize("runtime", ["threadctx", ""])
def test_otel_propagators_loads_it_through_its_entry_point(order: str, runtime: str) -> None:
    """What users do: OTEL_PROPAGATORS=tracecontext,threadctx, also with OTEL_PYTHON_CONTEXT=threadctx.

    Whatever the application imports first: threadctx's middlewares and functions too.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "THREADCTX_"))}
    env["OTEL_PROPAGATORS"] = "tracecontext,threadctx"
    if runtime:
        env["OTEL_PYTHON_CONTEXT"] = runtime
    env[REQUEST_ID_HEADER_ENV] = "X-Request-ID"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", PROGRAM, FIRST[order]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("ThreadRuntimeContext" if runtime else "ContextVarsRuntimeContext")
    assert "CorrelationPropagator(request_id_header='X-Request-ID')" in lines[1]
    assert lines[2] == "[('X-Request-ID', 'r-1'), ('baggage', 'request_id=r-1,other_tool=kept')]"  # IDs first
    assert lines[3] == "{'session': 'abc', 'secret': 'x'} {'request_id': 'r-2'}"
    assert result.stderr == ""


# ---- a real service B called by A through OpenTelemetry's client instrumentations -----------------


def service_b() -> WSGIApplication:
    """Logs one line per request and answers with what it was given: baggage, IDs, the raw header."""
    log = logging.getLogger("app")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        log.info("handled %s", environ["PATH_INFO"].strip("/"))
        answer = {
            "baggage": dict(baggage.get_all()),
            "ids": dict(threadctx.correlation()),
            "header": environ.get("HTTP_BAGGAGE", ""),
            "x_request_id": environ.get("HTTP_X_REQUEST_ID"),
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    return ContextMiddleware(app)


@dataclass
class Call:
    trace_id: str = ""
    answer: dict[str, Any] = field(default_factory=dict)


@contextmanager
def in_a(tracer: trace.Tracer, name: str, call: Call) -> Iterator[None]:
    """A's request ``name``: baggage another tool set, a span, a request id and an ID off the allowlist."""
    token = otel_context.attach(baggage.set_baggage("other_tool", f"kept-{name}"))
    try:
        with (
            tracer.start_as_current_span(f"A {name}") as span,
            threadctx.bound(request_id=f"req-{name}", secret="s3cr3t"),
        ):
            call.trace_id = format(span.get_span_context().trace_id, "032x")
            yield
    finally:
        otel_context.detach(token)


def in_threads(send: Callable[[str], dict[str, Any]], tracer: trace.Tracer) -> dict[str, Call]:
    calls: dict[str, Call] = {f"c{c}-{n}": Call() for c in range(CLIENTS) for n in range(PER_CLIENT)}
    barrier = threading.Barrier(CLIENTS)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            barrier.wait(60)
            for n in range(PER_CLIENT):
                name = f"c{index}-{n}"
                with in_a(tracer, name, calls[name]):
                    calls[name].answer = send(name)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    return calls


def in_tasks(port: int, tracer: trace.Tracer) -> dict[str, Call]:
    import httpx

    calls: dict[str, Call] = {f"t{t}": Call() for t in range(CLIENTS * PER_CLIENT)}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def one(name: str) -> None:
                with in_a(tracer, name, calls[name]):
                    calls[name].answer = (await client.get(f"/{name}")).json()

            await asyncio.gather(*(one(name) for name in calls))

    asyncio.run(main())
    return calls


@contextmanager
def instrumented(client: str, provider: TracerProvider) -> Iterator[None]:
    """OpenTelemetry's own client instrumentation for ``client``, on for the block."""
    if client == "requests":
        module = pytest.importorskip(
            "opentelemetry.instrumentation.requests",
            reason="opentelemetry-instrumentation-requests (test extra)",
        )
        instrumentor = module.RequestsInstrumentor()
    else:
        module = pytest.importorskip(
            "opentelemetry.instrumentation.httpx", reason="opentelemetry-instrumentation-httpx (test extra)"
        )
        instrumentor = module.HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


@pytest.mark.parametrize("request_id_header", [None, "X-Request-ID"])
@pytest.mark.parametrize("client", ["requests", "httpx", "httpx-async"])
def test_b_logs_with_as_trace_and_request_id_through_the_client_instrumentation(
    client: str, request_id_header: str | None, tracer_provider: TracerProvider
) -> None:
    """Every line of B has A's trace id and request id; secret never reaches B; other baggage survives."""
    library = client.split("-", 1)[0]
    pytest.importorskip(library, reason=f"{library} is in the test extra")
    lines = Lines()
    log = logging.getLogger("app")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    tracer = tracer_provider.get_tracer("service-a")
    textmap = CompositePropagator(
        [
            TraceContextTextMapPropagator(),
            threadctx.CorrelationPropagator(request_id_header=request_id_header),
        ]
    )
    try:
        with waitress_servers() as serve, global_textmap(textmap), instrumented(client, tracer_provider):
            port = serve(service_b())
            if client == "requests":
                import requests

                with requests.Session() as session:
                    calls = in_threads(
                        lambda name: session.get(f"http://127.0.0.1:{port}/{name}", timeout=60).json(), tracer
                    )
            elif client == "httpx":
                import httpx

                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                    calls = in_threads(lambda name: http.get(f"/{name}").json(), tracer)
            else:
                calls = in_tasks(port, tracer)
    finally:
        log.removeHandler(lines)
    assert len(lines.lines) == len(calls)
    wrong = []
    for line in lines.lines:
        match = LINE.match(line)
        assert match, line
        name = match["message"].split()[1]
        if (match["trace"], match["rid"]) != (calls[name].trace_id, f"req-{name}"):
            wrong.append(line)
    assert wrong == []
    for name, call in calls.items():
        assert call.answer["ids"] == {"request_id": f"req-{name}"}, "only the allowlisted ID reached B"
        assert call.answer["baggage"] == {"other_tool": f"kept-{name}"}, "the other tool's baggage survived"
        assert "s3cr3t" not in call.answer["header"]
        assert call.answer["x_request_id"] == (f"req-{name}" if request_id_header else None)


def test_hostile_baggage_sent_to_b_is_cut_and_refused(tracer_provider: TracerProvider) -> None:
    """Under the propagator, B cuts a hostile header to the limits and binds no invalid ID."""
    threadctx.allow_propagation("tenant")
    members = ["request_id=a%20b%3Bc", "tenant=a%0Aforged", *(f"m{i}=v" for i in range(100))]
    with (
        waitress_servers() as serve,
        global_textmap(TEXTMAPS["threadctx"]()),
    ):
        port = serve(service_b())
        status, headers, body = get(port, "/hostile", {"traceparent": VALID, "baggage": ",".join(members)})
    assert status == 200
    answer = json.loads(body)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), "an invalid request id was replaced"
    assert answer["ids"] == {"request_id": headers["x-request-id"]}, "tenant=a<LF>forged was not bound"
    assert len(answer["baggage"]) == threadctx.BAGGAGE_MAX_MEMBERS - 2, "cut at 64 members"


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_the_request_id_header_never_replaces_or_doubles_the_callers_own(
    client: str, tracer_provider: TracerProvider
) -> None:
    """A caller that sends its own X-Request-ID (in any case) keeps it: B gets that one value, once."""
    pytest.importorskip(client, reason=f"{client} is in the test extra")
    textmap = CompositePropagator(
        [TraceContextTextMapPropagator(), threadctx.CorrelationPropagator(request_id_header="X-Request-ID")]
    )
    seen_headers: list[list[str]] = []
    b = service_b()

    def collecting(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # waitress folds repeated headers into one comma-joined value: split it back.
        seen_headers.append([part.strip() for part in environ.get("HTTP_X_REQUEST_ID", "").split(",")])
        return b(environ, start_response)

    with waitress_servers() as serve, global_textmap(textmap), threadctx.bound(request_id="bound-1"):
        port = serve(collecting)
        for own in ("x-request-id", "X-Request-ID", "X-REQUEST-ID"):
            if client == "requests":
                with instrumented("requests", tracer_provider):
                    import requests

                    answer = requests.get(
                        f"http://127.0.0.1:{port}/own", headers={own: "callers-own"}, timeout=60
                    ).json()
            else:
                import urllib.request

                headers = threadctx.inject({own: "callers-own"})
                request = urllib.request.Request(f"http://127.0.0.1:{port}/own", headers=headers)
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
            assert seen_headers[-1] == ["callers-own"], f"{own}: {seen_headers[-1]}"
            assert answer["x_request_id"] == "callers-own"
            assert answer["ids"] == {"request_id": "callers-own"}


def test_hostile_baggage_cannot_crowd_the_ids_out_of_the_next_call(tracer_provider: TracerProvider) -> None:
    """A caller fills the baggage to the W3C limits: A's own request id still reaches B, first."""
    pytest.importorskip("requests", reason="requests is in the test extra")
    import requests

    hostile = ",".join(f"m{i:02d}={'x' * 125}" for i in range(64))  # 64 members, over 8192 bytes
    with (
        waitress_servers() as serve,
        global_textmap(TEXTMAPS["threadctx"]()),
        instrumented("requests", tracer_provider),
    ):
        port = serve(service_b())
        with threadctx.attached({"baggage": hostile}), threadctx.bound(request_id="req-a"):
            answer = requests.get(f"http://127.0.0.1:{port}/crowded", timeout=60).json()
    assert answer["ids"] == {"request_id": "req-a"}
    assert answer["header"].startswith("request_id=req-a,")
    assert len(answer["header"].encode()) <= threadctx.BAGGAGE_MAX_BYTES
