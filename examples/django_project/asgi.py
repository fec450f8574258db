"""The ASGI application: ``uvicorn django_project.asgi:application`` (from examples/).

threadctx's ASGI middleware goes around Django's ASGI application: it binds the request id in
the request's own task, where uvicorn writes the access line, so that line carries the ids too.
``django_application`` is Django's application alone (its ``MIDDLEWARE`` still binds them for the
view's lines, but not for the access line: see docs/django.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

from django.core.asgi import get_asgi_application
from span_file import configure_tracing

from threadctx.asgi import ContextMiddleware

configure_tracing()
django_application = get_asgi_application()
application = ContextMiddleware(django_application)
