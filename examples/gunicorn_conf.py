"""gunicorn settings: threaded workers, and access lines that carry the request's trace id and request id.

gunicorn writes the access line after the application has returned, outside
the request's context, so a logging filter alone would see no request. Two
ways in, both used here:

- ``%({x-request-id}o)s`` in ``access_log_format``: the response header that
  the middleware sets;
- ``ContextLogger``: writes the access line in the request's context, which
  the middleware left in the WSGI environ (``threadctx.wsgi.ENVIRON_CONTEXT``),
  so that ``threadctx.ContextFilter`` on the access handler adds the trace id
  (and every correlation ID).
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

import logging
from typing import Any

from gunicorn.glogging import Logger
from opentelemetry import context

import threadctx
from threadctx.wsgi import ENVIRON_CONTEXT

bind = "127.0.0.1:8000"
worker_class = "gthread"
workers = 1
threads = 8
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s request_id=%({x-request-id}o)s'


class ContextLogger(Logger):
    """gunicorn's logger, writing each access line in the context of the request it is about."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.access_log.handlers:
            handler.addFilter(threadctx.ContextFilter())
            handler.setFormatter(logging.Formatter("access %(message)s trace_id=%(trace_id)s"))

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        request_context = environ.get(ENVIRON_CONTEXT)
        if request_context is None:
            super().access(resp, req, environ, request_time)
            return
        token = context.attach(request_context)
        try:
            super().access(resp, req, environ, request_time)
        finally:
            context.detach(token)


logger_class = ContextLogger
