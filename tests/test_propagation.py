"""inject, extract and attached: W3C trace context and allowlisted correlation IDs, untrusted input."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import threadctx

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


def remote() -> tuple[str, str] | None:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def test_inject_sends_the_span_and_only_allowlisted_ids(tracer_provider: TracerProvider) -> None:
    with (
        tracer_provider.get_tracer("t").start_as_current_span("client") as span,
        threadctx.bound(request_id="r-1", tenant="acme", secret="s3cr3t"),
    ):
        headers = threadctx.inject({})
    span_context = span.get_span_context()
    assert (
        headers["traceparent"]
        == f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    )
    assert headers["baggage"] == "request_id=r-1"

    assert threadctx.allow_propagation("tenant") == {"request_id", "tenant"}
    assert threadctx.propagation_allowlist() == {"request_id", "tenant"}
    with threadctx.bound(request_id="r-1", tenant="acme", secret="s3cr3t"):
        headers = threadctx.inject({})
    assert sorted(headers["baggage"].split(",")) == ["request_id=r-1", "tenant=acme"]


def test_a_round_trip_restores_span_ids_and_baggage(tracer_provider: TracerProvider) -> None:
    threadctx.allow_propagation("tenant")
    context = baggage.set_baggage("region", "eu", baggage.set_baggage("request_id", "from-baggage"))
    token = otel_context.attach(context)
    try:
        with (
            tracer_provider.get_tracer("t").start_as_current_span("client") as span,
            threadctx.bound(request_id="r-2", tenant="a b,c=d"),
        ):
            headers = threadctx.inject({})
    finally:
        otel_context.detach(token)

    extracted = threadctx.extract(headers)
    assert threadctx.correlation(extracted) == {"request_id": "r-2", "tenant": "a b,c=d"}, (
        "a correlation ID wins over a baggage entry of the same name, and odd values survive encoding"
    )
    assert baggage.get_all(extracted) == {"region": "eu"}, "allowlisted members become correlation IDs"
    assert trace.get_current_span(extracted).get_span_context().span_id == span.get_span_context().span_id


def test_attached_makes_the_context_current_for_a_block_and_restores() -> None:
    threadctx.bind(worker="w1")
    with threadctx.attached({"traceparent": VALID, "baggage": "request_id=r-3"}) as context:
        assert remote() == (TRACE_ID, SPAN_ID)
        assert threadctx.correlation() == {"worker": "w1", "request_id": "r-3"}
        assert otel_context.get_current() is context
    assert remote() is None
    assert threadctx.correlation() == {"worker": "w1"}

    with pytest.raises(KeyError), threadctx.attached({"traceparent": VALID}):
        raise KeyError("handler failed")
    assert remote() is None


def test_ids_travel_with_a_propagator_that_sends_no_baggage() -> None:
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    try:
        with threadctx.attached({"traceparent": VALID, "baggage": "request_id=r-4"}):
            headers = threadctx.inject({})
            assert threadctx.correlation() == {"request_id": "r-4"}
    finally:
        propagate.set_global_textmap(saved)
    assert headers == {"traceparent": VALID, "baggage": "request_id=r-4"}


@pytest.fixture
def tracecontext_only() -> Iterator[None]:
    """OTEL_PROPAGATORS=tracecontext: the operator turned baggage off."""
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    yield
    propagate.set_global_textmap(saved)


@pytest.mark.usefixtures("tracecontext_only")
def test_with_baggage_off_inject_sends_the_allowlisted_ids_and_no_baggage() -> None:
    """Issue 11.2: the whole baggage (internal_user_email=...) went out with tracecontext alone."""
    token = otel_context.attach(baggage.set_baggage("internal_user_email", "ops@example.com"))
    try:
        with threadctx.bound(request_id="r-6", secret="s"):
            headers = threadctx.inject({"traceparent": VALID})
        assert headers == {"traceparent": VALID, "baggage": "request_id=r-6"}
        assert threadctx.inject({}) == {}, "no correlation ID bound: no baggage header at all"
    finally:
        otel_context.detach(token)


@pytest.mark.usefixtures("tracecontext_only")
def test_with_baggage_off_extract_keeps_no_incoming_member_but_the_allowlisted_ids() -> None:
    """Issue 11.2: every incoming member (session_token=...) was kept, and the next inject forwarded it."""
    carrier = {"traceparent": VALID, "baggage": "session_token=abc,request_id=r-7,tenant=t"}
    context = threadctx.extract(carrier)
    assert baggage.get_all(context) == {}
    assert threadctx.correlation(context) == {"request_id": "r-7"}
    assert threadctx.inject({}, context=context)["baggage"] == "request_id=r-7"
    context = threadctx.extract(carrier, context=otel_context.Context(), trace=False)
    assert (baggage.get_all(context), dict(threadctx.correlation(context))) == ({}, {"request_id": "r-7"})


def test_with_baggage_on_other_members_stay_baggage_and_travel() -> None:
    """The default propagators forward baggage, as OpenTelemetry does: threadctx changes nothing there."""
    context = threadctx.extract({"baggage": "session_token=abc,request_id=r-8"})
    assert baggage.get_all(context) == {"session_token": "abc"}
    assert sorted(threadctx.inject({}, context=context)["baggage"].split(",")) == [
        "request_id=r-8",
        "session_token=abc",
    ]


@pytest.mark.parametrize(
    "traceparent",
    [
        VALID.upper(),
        f"ff-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{'0' * 32}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}1-01",
        f"00-{TRACE_ID}-{SPAN_ID}-01-garbage",
        f"00-{TRACE_ID}-{SPAN_ID}-01garbage",
        f"00-{TRACE_ID}-{SPAN_ID}",
        VALID.replace("4", "\u0664"),  # ARABIC-INDIC DIGIT FOUR
        "",
        "x" * 10_000,
    ],
    ids=lambda value: repr(value)[:40],
)
def test_a_malformed_traceparent_is_ignored(traceparent: str) -> None:
    context = threadctx.extract({"traceparent": traceparent, "baggage": "request_id=r-5"})
    assert not trace.get_current_span(context).get_span_context().is_valid
    assert threadctx.correlation(context) == {"request_id": "r-5"}, "the rest of the carrier still counts"


def test_a_future_version_with_more_fields_is_accepted() -> None:
    """W3C Trace Context: a higher version is parsed as 00 and extra fields are ignored."""
    context = threadctx.extract({"traceparent": f"cc-{TRACE_ID}-{SPAN_ID}-01-future"})
    assert trace.get_current_span(context).get_span_context().trace_id == int(TRACE_ID, 16)


def test_baggage_over_the_member_limit_is_cut_at_whole_members() -> None:
    threadctx.allow_propagation("last")
    before = threadctx.propagation_stats()["baggage_members_cut"]
    members = [f"k{i}=v{i}" for i in range(threadctx.BAGGAGE_MAX_MEMBERS + 36)] + ["last=x"]
    context = threadctx.extract({"baggage": ",".join(members)})
    kept = baggage.get_all(context)
    assert list(kept) == [f"k{i}" for i in range(threadctx.BAGGAGE_MAX_MEMBERS)]
    assert threadctx.correlation(context) == {}, "a member past the limit is not read"
    assert threadctx.propagation_stats()["baggage_members_cut"] - before == 37


def test_baggage_over_the_byte_limit_is_cut_at_whole_members() -> None:
    value = "v" * 990
    members = [f"k{i}={value}" for i in range(10)]  # 10 x 994 bytes + commas > 8192
    header = ",".join(members)
    assert len(header) > threadctx.BAGGAGE_MAX_BYTES
    kept = baggage.get_all(threadctx.extract({"baggage": header}))
    assert kept == {f"k{i}": value for i in range(8)}, "8 whole members fit in 8192 bytes, the 9th does not"


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("request_id=a%0Ab", "percent-encoded line feed"),
        ("request_id=a%1B%5B31mred", "ANSI escape"),
        ("request_id=a%E2%80%A8b", "Unicode line separator"),
        (f"request_id={'x' * (threadctx.CORRELATION_MAX_VALUE_LENGTH + 1)}", "too long"),
        ("request_id=a\nb", "raw line feed"),
        ("request_id=caf\u00e9", "raw non-ASCII"),
    ],
)
def test_invalid_correlation_values_are_dropped_counted_and_never_logged(
    member: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = threadctx.propagation_stats()
    with caplog.at_level(logging.DEBUG):
        context = threadctx.extract({"baggage": f"{member},tenant=t1", "traceparent": VALID})
    after = threadctx.propagation_stats()
    assert threadctx.correlation(context) == {}, reason
    assert baggage.get_all(context) == {"tenant": "t1"}, "the valid members are kept"
    assert trace.get_current_span(context).get_span_context().trace_id == int(TRACE_ID, 16)
    dropped = (after["invalid_ids"] - before["invalid_ids"]) + (
        after["baggage_members_cut"] - before["baggage_members_cut"]
    )
    assert dropped == 1
    for record in caplog.records:
        message = record.getMessage()
        assert not {"\n", "\x1b", "\u2028"} & set(message), message


def test_allow_propagation_rejects_a_name_that_is_not_an_identifier() -> None:
    """Nothing is added when one name is invalid, not even the valid ones before it."""
    with pytest.raises(ValueError, match="not an ASCII identifier"):
        threadctx.allow_propagation("tenant", "tenant-id")
    assert threadctx.propagation_allowlist() == {"request_id"}


def test_set_propagation_allowlist_replaces_the_whole_list() -> None:
    """Names come off the list too: request_id stops travelling, and the default comes back."""
    threadctx.allow_propagation("tenant")
    assert threadctx.set_propagation_allowlist(["user_id"]) == {"user_id"}
    assert threadctx.propagation_allowlist() == {"user_id"}
    with threadctx.bound(request_id="r-1", tenant="acme", user_id="u-7"):
        assert threadctx.inject({})["baggage"] == "user_id=u-7"
    assert threadctx.correlation(threadctx.extract({"baggage": "request_id=r-2,user_id=u-8"})) == {
        "user_id": "u-8"
    }

    assert threadctx.set_propagation_allowlist(()) == frozenset()
    with threadctx.bound(request_id="r-1"):
        assert "baggage" not in threadctx.inject({})

    assert threadctx.set_propagation_allowlist({"request_id"}) == {"request_id"}
    with threadctx.bound(request_id="r-1"):
        assert threadctx.inject({})["baggage"] == "request_id=r-1"


def test_set_propagation_allowlist_refuses_a_string_and_an_invalid_name() -> None:
    """A bare string would be taken letter by letter; an invalid name leaves the list as it was."""
    with pytest.raises(TypeError, match="collection of names"):
        threadctx.set_propagation_allowlist("tenant")
    with pytest.raises(ValueError, match="not an ASCII identifier"):
        threadctx.set_propagation_allowlist(["tenant", "tenant id"])
    assert threadctx.propagation_allowlist() == {"request_id"}


def test_extract_without_trace_keeps_the_current_span(tracer_provider: TracerProvider) -> None:
    with tracer_provider.get_tracer("t").start_as_current_span("server") as span:
        context = threadctx.extract({"traceparent": VALID, "baggage": "request_id=r-6"}, trace=False)
    assert trace.get_current_span(context) is span
    assert threadctx.correlation(context) == {"request_id": "r-6"}


def test_a_tracestate_member_that_could_break_a_log_line_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Found by the fuzz test: OpenTelemetry logs an invalid tracestate member verbatim."""
    before = threadctx.propagation_stats()["tracestate_members_cut"]
    with caplog.at_level(logging.DEBUG):
        context = threadctx.extract({"traceparent": VALID, "tracestate": "a=b\n,vendor=ok,c=\x1b[31md"})
    trace_state = trace.get_current_span(context).get_span_context().trace_state
    assert dict(trace_state) == {"vendor": "ok"}
    assert threadctx.propagation_stats()["tracestate_members_cut"] == before + 2
    assert not [record for record in caplog.records if not record.getMessage().isprintable()]


def test_attached_inside_a_server_span_keeps_it_as_the_parent(tracer_provider: TracerProvider) -> None:
    """Issue 13.6: attached(headers) inside a request replaced the server span as parent of all below."""
    tracer = tracer_provider.get_tracer("t")
    with (
        tracer.start_as_current_span("GET /orders", kind=trace.SpanKind.SERVER) as server,
        threadctx.attached({"traceparent": VALID, "baggage": "request_id=r-9"}),
    ):
        assert trace.get_current_span() is server
        assert threadctx.correlation() == {"request_id": "r-9"}
    with (
        tracer.start_as_current_span("consume", kind=trace.SpanKind.CONSUMER),
        threadctx.attached({"traceparent": VALID}),
    ):
        assert remote() == (TRACE_ID, SPAN_ID), "any other span is replaced, as before"
