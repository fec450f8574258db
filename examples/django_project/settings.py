"""Settings of the example Django project (no database: the views only log)."""

from __future__ import annotations

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
TIME_ZONE = "UTC"  # Django's default, America/Chicago, would also set the worker process's TZ

MIDDLEWARE = [
    # DjangoInstrumentor().instrument() puts OpenTelemetry's middleware before this one:
    # threadctx's then runs inside its SERVER span and binds the request id under it.
    "threadctx.django.ContextMiddleware",
]

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
        },
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
