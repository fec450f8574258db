"""Flask and Django under gunicorn's gthread workers: real processes, concurrent clients, every line."""

from __future__ import annotations

import json
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

import pytest

from _servers import (
    LINE,
    app_lines,
    clean_env,
    concurrent_requests,
    free_port,
    get,
    misattributed,
    python,
    running,
)

CLIENTS = 16
PER_CLIENT = 4
APPS = {"flask": "flask_app:app", "django": "django_project.wsgi"}
INSTRUMENTATION = {
    "flask": "opentelemetry.instrumentation.flask",
    "django": "opentelemetry.instrumentation.django",
}
ACCESS = re.compile(
    r'access 127\.0\.0\.1 "GET (?P<path>\S+) HTTP/1\.1" 200 '
    r"request_id=(?P<rid>\S+) trace_id=(?P<trace>[0-9a-f]{32})"
)


def serve(framework: str, tmp_path: Path, instrument: bool) -> Any:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test group")
    pytest.importorskip(framework, reason=f"{framework} is in the test group")
    if instrument:
        pytest.importorskip(INSTRUMENTATION[framework], reason="the contrib packages are in the test group")
    port = free_port()
    spans = tmp_path / "spans.jsonl"
    env = clean_env(
        THREADCTX_EXAMPLE_SPANS=str(spans), THREADCTX_EXAMPLE_INSTRUMENT="1" if instrument else "0"
    )
    command = python(
        "-m", "gunicorn", "-c", "gunicorn_conf.py", "--bind", f"127.0.0.1:{port}", APPS[framework]
    )
    return running(command, port, tmp_path / "gunicorn.log", env), spans


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("instrument", [False, True], ids=["plain", "instrumented"])
@pytest.mark.parametrize("framework", ["flask", "django"])
def test_every_line_of_concurrent_requests_belongs_to_its_request(
    framework: str, instrument: bool, tmp_path: Path
) -> None:
    """Issue 13.3, 13.4, 13.5, 13.6: lines, spans and the access log under gunicorn gthread."""
    server_context, spans_path = serve(framework, tmp_path, instrument)
    with server_context as server:
        sent = concurrent_requests(server.port, lambda name: f"/work/{name}", CLIENTS, PER_CLIENT)
        status, untraced, body = get(server.port, "/work/untraced", {"X-Request-ID": "r-untraced"})
        output = server.stop()
    assert (status, untraced["x-request-id"], json.loads(body)) == (
        200,
        "r-untraced",
        {"request_id": "r-untraced"},
    )
    for name, request in sent.items():
        assert (request.status, request.echoed) == (200, request.request_id), name
        assert json.loads(request.body) == {"request_id": request.request_id}

    lines = app_lines(output)
    ours = [line for line in lines if not line.endswith(" untraced")]
    assert len(ours) == 3 * len(sent), output[-3000:]
    assert misattributed(ours, sent) == []
    untraced_lines = [LINE.match(line) for line in lines if line.endswith(" untraced")]
    assert [match["rid"] for match in untraced_lines if match] == ["r-untraced"] * 3, (
        "without a traceparent the request id is kept too (the instrumentor used to drop it)"
    )

    spans = read_spans(spans_path)
    by_id = {span["span_id"]: span for span in spans}
    work = [span for span in spans if span["name"] == "work"]
    assert len(work) == len(sent) + 1
    if instrument:
        servers = [span for span in spans if span["kind"] == "SERVER"]
        assert len(servers) == len(sent) + 1
        assert {span["name"] for span in servers} == {
            "GET /work/<name>" if framework == "flask" else "GET work/<str:name>"
        }, "the framework's span keeps its kind and its route name"
        for span in work:
            assert by_id[span["parent_id"]]["kind"] == "SERVER"
        remote = sorted((span["trace_id"], span["parent_id"]) for span in servers if span["parent_id"])
    else:
        remote = sorted((span["trace_id"], span["parent_id"]) for span in work if span["parent_id"])
    assert remote == sorted((request.trace_id, request.span_id) for request in sent.values())

    access = [ACCESS.match(line) for line in output.splitlines() if line.startswith("access ")]
    assert len(access) == len(sent) + 1, output[-3000:]
    assert all(access), output[-3000:]
    by_path = {match["path"]: match for match in access if match}
    for name, request in sent.items():
        match = by_path[f"/work/{name}"]
        assert (match["rid"], match["trace"]) == (request.request_id, request.trace_id), match.group(0)
    assert by_path["/work/untraced"]["rid"] == "r-untraced"
    assert by_path["/work/untraced"]["trace"] != "0" * 32 or not instrument


def test_a_hostile_request_id_is_replaced_under_gunicorn(tmp_path: Path) -> None:
    server_context, _ = serve("flask", tmp_path, instrument=False)
    with server_context as server:
        status, headers, body = get(
            server.port, "/work/hostile", {"baggage": "request_id=a%20b%3Bc%22%2C%3Cscript%3E"}
        )
        traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        status2, headers2, _ = get(
            server.port, "/work/h2", {"X-Request-ID": "a\tb", "traceparent": traceparent}
        )
    assert (status, status2) == (200, 200)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert json.loads(body) == {"request_id": headers["x-request-id"]}
    assert re.fullmatch(r"[0-9a-f]{32}", headers2["x-request-id"])


@pytest.mark.parametrize("init_first", [True, False], ids=["init_app-first", "instrumentor-first"])
def test_flask_init_app_beside_the_instrumentor_in_either_order(
    tracer_provider: Any, exporter: Any, init_first: bool
) -> None:
    """Issue 13.6: in the order a user writes them, a SERVER span with its route and the ids under it."""
    flask = pytest.importorskip("flask")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.flask")
    from opentelemetry import trace

    import threadctx
    from threadctx.flask import init_app

    seen: list[tuple[object, dict[str, str]]] = []
    app = flask.Flask("either_order")

    @app.get("/orders/<name>")
    def orders(name: str) -> str:
        seen.append((trace.get_current_span().get_span_context().span_id, dict(threadctx.correlation())))
        return name

    if init_first:
        init_app(app)
    instrumentation.FlaskInstrumentor().instrument_app(app, tracer_provider=tracer_provider)
    if not init_first:
        init_app(app)
    try:
        client = app.test_client()
        for index, traceparent in enumerate(
            [f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", None] * 2
        ):
            headers = {"X-Request-ID": f"r-{index}"} | ({"traceparent": traceparent} if traceparent else {})
            response = client.get(f"/orders/{index}", headers=headers)
            assert response.headers["X-Request-ID"] == f"r-{index}"
            assert threadctx.correlation() == {}, "nothing is left attached after the request"
            assert not trace.get_current_span().get_span_context().is_valid
    finally:
        instrumentation.FlaskInstrumentor().uninstrument_app(app)
    spans = exporter.get_finished_spans()
    assert [(span.kind, span.name) for span in spans] == [(trace.SpanKind.SERVER, "GET /orders/<name>")] * 4
    assert seen == [(span.context.span_id, {"request_id": f"r-{index}"}) for index, span in enumerate(spans)]


@pytest.mark.parametrize("with_context", [False, True], ids=["generator", "stream_with_context"])
def test_flask_streamed_body_is_produced_in_the_requests_context(with_context: bool) -> None:
    """Each step of a streamed response runs with the request id; nothing is left attached after.

    Flask pops the request context (and init_app's hooks detach) before the server iterates a
    plain generator, which used to run with no request id; ``stream_with_context`` keeps the
    request context until the last step, and must not be bound a second time (that would leave
    the request's context attached to the worker thread).
    """
    flask = pytest.importorskip("flask")

    import threadctx
    from threadctx.flask import init_app

    app = flask.Flask("streaming")
    init_app(app)
    seen: list[dict[str, str]] = []

    @app.get("/stream")
    def stream() -> Any:
        def steps() -> Any:
            for step in ("one", "two"):
                seen.append(dict(threadctx.correlation()))
                yield step.encode()

        return flask.Response(flask.stream_with_context(steps()) if with_context else steps())

    client = app.test_client()
    for request_id in ("r-s1", "r-s2"):
        response = client.get("/stream", headers={"X-Request-ID": request_id})
        assert response.data == b"onetwo"
        assert response.headers["X-Request-ID"] == request_id
        assert threadctx.correlation() == {}, "nothing is left attached after the response"
    assert seen == [{"request_id": "r-s1"}] * 2 + [{"request_id": "r-s2"}] * 2


def test_django_streaming_content_is_produced_in_the_requests_context() -> None:
    pytest.importorskip("django")
    from django.conf import settings
    from django.http import HttpRequest, StreamingHttpResponse

    import threadctx
    from threadctx.django import ContextMiddleware

    if not settings.configured:
        settings.configure(DEFAULT_CHARSET="utf-8")

    def chunks() -> Any:
        yield threadctx.correlation()["request_id"].encode()

    middleware = ContextMiddleware(lambda request: StreamingHttpResponse(chunks()))
    request = HttpRequest()
    request.META["HTTP_X_REQUEST_ID"] = "r-stream"
    response = middleware(request)
    assert threadctx.correlation() == {}
    assert b"".join(response) == b"r-stream"
    assert response["X-Request-ID"] == "r-stream"
    response.close()


def test_django_file_response_still_reaches_the_servers_file_wrapper(tmp_path: Path) -> None:
    """A FileResponse keeps ``file_to_stream``, which Django's WSGI handler gives to ``wsgi.file_wrapper``.

    The middleware used to replace its ``streaming_content`` like any streaming response's, and
    that setter drops ``file_to_stream``: the file no longer reached the server's ``sendfile()``.
    """
    pytest.importorskip("django")
    from django.conf import settings
    from django.http import FileResponse

    from threadctx.django import ContextMiddleware

    if not settings.configured:
        settings.configure(DEFAULT_CHARSET="utf-8")
    path = tmp_path / "report.bin"
    path.write_bytes(b"x" * 10_000)
    with path.open("rb") as file:
        response = ContextMiddleware(lambda request: FileResponse(file))(_django_request("r-file"))
        assert response.file_to_stream is file
        assert response["X-Request-ID"] == "r-file"
        assert b"".join(response) == b"x" * 10_000


def _django_request(request_id: str) -> Any:
    from django.http import HttpRequest

    request = HttpRequest()
    request.META["HTTP_X_REQUEST_ID"] = request_id
    return request


def test_django_middleware_before_opentelemetrys_warns_when_loaded() -> None:
    pytest.importorskip("django")
    from django.conf import settings
    from django.test import override_settings

    from threadctx.django import ContextMiddleware

    if not settings.configured:
        settings.configure(DEFAULT_CHARSET="utf-8")
    otel = "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"
    ours = "threadctx.django.ContextMiddleware"
    with override_settings(MIDDLEWARE=[ours, otel]), pytest.warns(UserWarning, match="Put it after"):
        ContextMiddleware(lambda request: None)
    with override_settings(MIDDLEWARE=[otel, ours]), warnings.catch_warnings():
        warnings.simplefilter("error")
        ContextMiddleware(lambda request: None)


def test_the_wsgi_middleware_outside_a_framework_instrumentor_says_what_to_use(tracer_provider: Any) -> None:
    """Issue 13.6: it lost the ids and turned the framework's span INTERNAL, and nothing warned."""
    flask = pytest.importorskip("flask")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.flask")
    from threadctx.wsgi import ContextMiddleware

    app = flask.Flask("instrumented")
    instrumentation.FlaskInstrumentor().instrument_app(app, tracer_provider=tracer_provider)
    try:
        with pytest.warns(UserWarning, match=r"threadctx\.flask\.init_app\(app\)"):
            ContextMiddleware(app.wsgi_app)
        with pytest.warns(UserWarning, match=r"threadctx\.flask\.init_app\(app\)"):
            ContextMiddleware(app)  # the Flask app itself: its wsgi_app is the instrumentor's
    finally:
        instrumentation.FlaskInstrumentor().uninstrument_app(app)
    plain = flask.Flask("plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContextMiddleware(plain.wsgi_app)
    pytest.importorskip("django")
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    if not settings.configured:
        settings.configure(DEFAULT_CHARSET="utf-8")
    handler = WSGIHandler.__new__(WSGIHandler)  # the real class; loading its middleware is not the point
    otel = "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"
    with (
        override_settings(MIDDLEWARE=[otel]),
        pytest.warns(UserWarning, match=r"threadctx\.django\.ContextMiddleware in MIDDLEWARE"),
    ):
        ContextMiddleware(handler)
    with override_settings(MIDDLEWARE=[]), warnings.catch_warnings():
        warnings.simplefilter("error")
        ContextMiddleware(handler)


def test_the_gunicorn_page_shows_the_example_settings_as_they_are() -> None:
    """docs/gunicorn.md's settings block is examples/gunicorn_conf.py, which the tests above serve with."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "gunicorn.md").read_text()
    block = re.findall(r"^```python\n(.*?)^```$", page, re.M | re.S)[0]
    example = (Path(__file__).resolve().parent.parent / "examples" / "gunicorn_conf.py").read_text()
    assert example.endswith(block)
