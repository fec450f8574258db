"""One view: it logs, runs a task on a pool, and starts a span."""

from __future__ import annotations

import logging

from django.http import HttpRequest, JsonResponse
from django.urls import path
from opentelemetry import trace

import threadctx

log = logging.getLogger("service")
tracer = trace.get_tracer("examples.django_project")
pool = threadctx.ContextThreadPoolExecutor(max_workers=4)


def work(request: HttpRequest, name: str) -> JsonResponse:
    log.info("view %s", name)
    pool.submit(log.info, "pool %s", name).result()
    with tracer.start_as_current_span("work"):
        log.info("span %s", name)
    return JsonResponse({"request_id": threadctx.correlation()["request_id"]})


urlpatterns = [path("work/<str:name>", work)]
