"""Django under a real uvicorn on 127.0.0.1: which middleware gives uvicorn's access line its ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _servers import (
    LINE,
    app_lines,
    clean_env,
    concurrent_requests,
    free_port,
    misattributed,
    python,
    running,
)

CLIENTS = 16
PER_CLIENT = 4
ACCESS = re.compile(
    r"access trace_id=(?P<trace>\w+) request_id=(?P<rid>\S+) "
    r'127\.0\.0\.1:\d+ - "GET /work/(?P<name>\S+) HTTP/1\.1" 200'
)
# The access handler of examples/uvicorn_logging.json, with "-" for a line outside any request.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "threadctx.ContextFilter"}},
    "formatters": {
        "access": {
            "()": "logging.Formatter",
            "fmt": "access trace_id=%(trace_id)s request_id=%(request_id)s %(message)s",
            "defaults": {"request_id": "-"},
        }
    },
    "handlers": {
        "access": {
            "class": "logging.StreamHandler",
            "filters": ["context"],
            "formatter": "access",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False}},
}


@pytest.mark.parametrize(
    ("application", "access_has_ids"),
    [("application", True), ("django_application", False)],
    ids=["asgi-middleware", "django-middleware-only"],
)
def test_uvicorn_serving_django(application: str, access_has_ids: bool, tmp_path: Path) -> None:
    """The view's lines carry their request's ids either way; the access line, with the ASGI middleware."""
    pytest.importorskip("uvicorn", reason="uvicorn is in the test group")
    pytest.importorskip("django", reason="django is in the test group")
    config = tmp_path / "logging.json"
    config.write_text(json.dumps(LOG_CONFIG))
    port = free_port()
    command = python(
        "-m", "uvicorn", f"django_project.asgi:{application}", "--host", "127.0.0.1", "--port", str(port),
        "--log-config", str(config),
    )  # fmt: skip
    with running(command, port, tmp_path / "uvicorn.log", clean_env()) as server:
        sent = concurrent_requests(server.port, lambda name: f"/work/{name}", CLIENTS, PER_CLIENT)
        output = server.stop()
    for name, request in sent.items():
        assert (request.status, request.echoed, json.loads(request.body)) == (
            200,
            request.request_id,
            {"request_id": request.request_id},
        ), name
    lines = [line for line in app_lines(output) if LINE.match(line)]
    assert len(lines) == 3 * len(sent), output
    assert misattributed(lines, sent) == []
    access = [ACCESS.fullmatch(line) for line in output.splitlines() if line.startswith("access ")]
    assert len(access) == len(sent), output
    for match in access:
        assert match is not None
        request = sent[match["name"]]
        if access_has_ids:
            assert (match["trace"], match["rid"]) == (request.trace_id, request.request_id)
        else:
            assert (match["trace"], match["rid"]) == ("0" * 32, "-"), "the Django middleware alone"
