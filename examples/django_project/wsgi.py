"""The WSGI application: ``gunicorn -c gunicorn_conf.py django_project.wsgi`` (from examples/).

``THREADCTX_EXAMPLE_INSTRUMENT=1`` adds OpenTelemetry's ``DjangoInstrumentor``;
``THREADCTX_EXAMPLE_SPANS=FILE`` writes the spans to FILE.
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

from django.core.wsgi import get_wsgi_application
from span_file import configure_tracing

configure_tracing()
if os.environ.get("THREADCTX_EXAMPLE_INSTRUMENT") == "1":
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()  # before the application loads its middleware

application = get_wsgi_application()
