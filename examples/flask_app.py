"""A Flask service whose every log line carries its request's trace and request id.

Run it under gunicorn's threaded workers (settings in ``gunicorn_conf.py``)::

    cd examples && gunicorn -c gunicorn_conf.py flask_app:app
    curl -H 'X-Request-ID: r-1' http://127.0.0.1:8000/work/one

Logging is configured with ``dictConfig``, the filter named by its dotted
path. ``THREADCTX_EXAMPLE_INSTRUMENT=1`` adds OpenTelemetry's
``FlaskInstrumentor`` (its SERVER span, named after the route, is then the
parent of everything the request does); ``THREADCTX_EXAMPLE_SPANS=FILE``
writes the spans to FILE.
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

import logging
import logging.config

from flask import Flask
from opentelemetry import trace
from span_file import configure_tracing

import threadctx
from threadctx.flask import init_app

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "threadctx.ContextFilter"}},
    "formatters": {
        "service": {
            # "()" passes `defaults` on Python 3.10 and 3.11 too: "-" outside a request.
            "()": "logging.Formatter",
            "fmt": "trace=%(trace_id)s span=%(span_id)s request_id=%(request_id)s %(message)s",
            "defaults": {"request_id": "-"},
        }
    },
    "handlers": {
        "service": {
            "class": "logging.StreamHandler",
            "filters": ["context"],
            "formatter": "service",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"service": {"handlers": ["service"], "level": "INFO", "propagate": False}},
}

logging.config.dictConfig(LOGGING)
configure_tracing()
log = logging.getLogger("service")
tracer = trace.get_tracer("examples.flask_app")
pool = threadctx.ContextThreadPoolExecutor(max_workers=4)

app = Flask(__name__)
if os.environ.get("THREADCTX_EXAMPLE_INSTRUMENT") == "1":
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(app)
init_app(app)  # before or after the instrumentor: its hooks run inside the SERVER span


@app.get("/work/<name>")
def work(name: str) -> dict[str, str]:
    log.info("view %s", name)
    pool.submit(log.info, "pool %s", name).result()
    with tracer.start_as_current_span("work"):
        log.info("span %s", name)
    return {"request_id": threadctx.correlation()["request_id"]}
