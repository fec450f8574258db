"""A page of what every thread serves, to mount in the service: ``/threadz``.

The zPages idea (``/tracez`` in OpenTelemetry's Java, Go and C++ SDKs) for
threadctx's table: one row per thread serving a request, with its age,
trace id, span and correlation IDs, the oldest first; as an HTML page that
refreshes itself, or as JSON::

    from threadctx import threadz

    threadz_app = threadz.wsgi_app()   # Flask, Django, waitress, gunicorn: any WSGI server
    threadz_app = threadz.asgi_app()   # FastAPI, Starlette, uvicorn: any ASGI server

Mount it at ``/threadz`` with your framework's way of mounting an
application (Werkzeug's ``DispatcherMiddleware``, Starlette's ``Mount``).

Safe by default: it answers only clients on a loopback address that did
not come through a proxy and name a loopback ``Host``, unless ``allow=``
says otherwise; every value is escaped; stacks are shown only with
``stacks=True``; nothing runs until a request comes.  Behind a reverse
proxy on the same host, keep ``/threadz`` off the proxy or pass ``allow=``:
some servers (waitress) remove the proxy's ``X-Forwarded-*`` headers before
the application sees them.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from threadctx._ops.table import DEFAULT_THRESHOLD, FirstSeen, Row, age_text, rows_of, serving_stacks
from threadctx._snapshot import snapshot
from threadctx._text import printable

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["asgi_app", "wsgi_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Headers a proxy adds: behind one, every client seems to come from the proxy's (loopback) address.
#: Any ``X-Forwarded-*`` header counts too (a proxy may send only ``X-Forwarded-Proto``).
_FORWARDED = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
    }
)

_Response = tuple[int, list[tuple[str, str]], bytes]

_REASONS = {200: "OK", 403: "Forbidden", 405: "Method Not Allowed"}

_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .25em .8em .25em 0; vertical-align: top; }
th { border-bottom: 1px solid #888; }
td.id, td.age, pre { font-family: ui-monospace, monospace; font-size: 13px; }
td.age { text-align: right; }
td.age, td.id, td.thread { white-space: nowrap; }
tr.stuck td { color: #b00; font-weight: bold; }
pre { margin: 0 0 .6em; color: #444; }
""".strip()


def _loopback(address: str | None) -> bool:
    """Whether ``address`` (an IP address as a server reports it) is a loopback address."""
    if not address:
        return False  # a Unix socket, or a server that does not say: not known to be local
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _local_host(host: str | None) -> bool:
    """Whether the request's ``Host`` names this machine's loopback: ``localhost``, a loopback address.

    A browser on this host sends the name it was pointed at: a page whose name an attacker made
    resolve to 127.0.0.1 (DNS rebinding) comes from a loopback address, but with the attacker's
    name.  No ``Host`` at all (HTTP/1.0, a script) is no browser.
    """
    if not host:
        return True
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name, _, port = host.rpartition(":")
        if not (name and port.isdigit()):
            name = host
    name = name.rstrip(".")
    return (
        name == "localhost"
        or name.endswith(".localhost")
        or name == socket.gethostname().lower()
        or _loopback(name)
    )


class _Page:
    """What both apps answer, from the method, the query string and the Accept header."""

    def __init__(self, *, stacks: bool, refresh: float, threshold: float, frames: int) -> None:
        if not (isinstance(refresh, (int, float)) and refresh > 0):
            raise ValueError(f"refresh must be a positive number of seconds, not {refresh!r}")
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"threshold must be a positive number of seconds, not {threshold!r}")
        if frames < 0:
            raise ValueError(f"frames must be 0 or more, not {frames}")
        self.stacks = stacks
        self.refresh = refresh
        self.threshold = threshold
        self.frames = frames
        self._ages = FirstSeen()
        self._lock = threading.Lock()  # for _ages: two requests for the page at once

    def respond(self, method: str, query: str, accept: str, allowed: bool) -> _Response:
        if not allowed:
            return _text(
                403,
                "threadz answers loopback clients only (at http://localhost or a loopback address, not "
                "through a proxy); pass allow= to threadz.wsgi_app() or asgi_app()",
            )
        if method not in ("GET", "HEAD"):
            status, headers, body = _text(405, "threadz answers GET and HEAD only")
            return status, [*headers, ("Allow", "GET, HEAD")], body
        rows = self.rows()
        chosen = parse_qs(query).get("format", [""])[-1]
        if chosen == "json" or (chosen != "html" and _wants_json(accept)):
            data = [row.as_json(stack=self.stacks) for row in rows]
            for item in data:  # what ``snapshot()`` calls them; no more
                del item["native_id"]
            body = json.dumps(data, indent=1).encode()
            status, headers = 200, [("Content-Type", "application/json")]
        else:
            body = self.html(rows).encode()
            status, headers = 200, [("Content-Type", "text/html; charset=utf-8")]
        headers += [*_SECURITY_HEADERS, ("Content-Length", str(len(body)))]
        return status, headers, b"" if method == "HEAD" else body

    def rows(self) -> list[Row]:
        entries = snapshot()
        stacks = serving_stacks(entries, self.frames, source=True) if self.stacks else None
        rows = rows_of(entries, stacks, exclude=threading.get_ident())  # not this request's own thread
        with self._lock:
            return self._ages.fill(rows)

    def html(self, rows: list[Row]) -> str:
        taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        out = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{self.refresh:g}">',
            f"<title>threadz: process {os.getpid()}</title>",
            f"<style>{_STYLE}</style></head><body>",
            "<h1>threadz</h1>",
            f"<p>Process {os.getpid()}: <span id=count>{len(rows)}</span> threads serving requests at "
            f"{taken}, the oldest first; rows {self.threshold:g}&#8239;s or older in red. "
            f"Refreshed every {self.refresh:g}&#8239;s; "
            '<a href="?format=json">JSON</a>.</p>',
            "<table><thead><tr><th>age</th><th>thread</th><th>trace id</th><th>span id</th>"
            "<th>span</th><th>correlation</th></tr></thead><tbody>",
        ]
        for row in rows:
            stuck = row.age_s is not None and row.age_s >= self.threshold
            correlation = " ".join(
                f"<code>{_e(name)}={_e(value)}</code>" for name, value in row.correlation.items()
            )
            out.append(
                f'<tr class="{"row stuck" if stuck else "row"}" data-thread-id="{row.thread_id}">'
                f'<td class="age">{_e(age_text(row.age_s))}</td><td class="thread">{_e(row.thread)}</td>'
                f'<td class="id">{_e(row.trace_id or "")}</td><td class="id">{_e(row.span_id or "")}</td>'
                f"<td>{_e(row.span_name or '')}</td><td>{correlation}</td></tr>"
            )
            if self.stacks:
                stack = "\n".join(_e(line) for line in row.stack)
                out.append(f'<tr class="stack"><td colspan="6"><pre>{stack}</pre></td></tr>')
        if not rows:
            out.append('<tr><td colspan="6">No thread is serving a request.</td></tr>')
        out.append("</tbody></table></body></html>")
        return "\n".join(out) + "\n"


def _e(text: str) -> str:
    """``text`` for HTML: escaped, and every character that is not printable shown as an escape."""
    return html.escape(printable(text))


def _wants_json(accept: str) -> bool:
    """Whether the Accept header asks for JSON rather than HTML (a browser's asks for HTML)."""
    types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    return "application/json" in types and "text/html" not in types


def _text(status: int, message: str) -> _Response:
    body = (message + "\n").encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), *_SECURITY_HEADERS]
    return status, [*headers, ("Content-Length", str(len(body)))], body


def _proxied(names: Iterable[str]) -> bool:
    return any(name in _FORWARDED or name.startswith("x-forwarded-") for name in names)


def wsgi_app(
    *,
    allow: Callable[[WSGIEnvironment], bool] | None = None,
    stacks: bool = False,
    refresh: float = 2.0,
    threshold: float = DEFAULT_THRESHOLD,
    frames: int = 8,
) -> WSGIApplication:
    """Return a WSGI application that shows every thread serving a request: the threadz page.

    It answers ``GET`` (and ``HEAD``) with an HTML table, one row per thread
    serving a request (a span, or correlation IDs bound without one): its
    age, thread name, trace id, span id, span name and correlation IDs, the
    oldest first, rows at least ``threshold`` seconds old in red.  The page
    reloads itself every ``refresh`` seconds (an HTML ``meta`` refresh: no
    script).  With ``?format=json``, or ``Accept: application/json``, it
    answers a JSON list of objects with ``thread``, ``thread_id``,
    ``trace_id``, ``span_id``, ``span_name``, ``age_s`` and ``correlation``
    (and ``stack``, a list of lines, with ``stacks=True``)::

        from werkzeug.middleware.dispatcher import DispatcherMiddleware

        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/threadz": threadz.wsgi_app()})

    A row's age comes from its span's start (SDK spans), else from the first
    time the page saw that thread serve that request.  The request for the
    page itself is left out.  Nothing runs until the page is requested.

    Args:
        allow: decides, from the request's environ, whether to answer it.
            Without it, only clients on a loopback address (``REMOTE_ADDR``)
            whose request carries no ``Forwarded``, ``Via``, ``X-Forwarded-*``,
            ``X-Real-IP`` or other client-address header (behind a proxy on
            the same host, every client seems local), and whose ``Host`` is
            ``localhost``, a loopback address or this machine's name (a web
            page whose name was made to resolve to 127.0.0.1, DNS
            rebinding, sends its own) are answered; the others get ``403``.
        stacks: also show each thread's innermost ``frames`` frames, with
            their source lines (which name the code the service runs).
        refresh: seconds between two reloads of the page.
        threshold: seconds from which a row is shown in red (the
            watchdog's default threshold by default).
        frames: how many frames of each stack, with ``stacks=True``.

    Raises:
        ValueError: ``refresh`` or ``threshold`` is not positive, or
            ``frames`` is negative.

    .. versionadded:: 0.1.0
    """
    page = _Page(stacks=stacks, refresh=refresh, threshold=threshold, frames=frames)

    def threadz(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if allow is not None:
            allowed = bool(allow(environ))
        else:
            names = (key[5:].replace("_", "-").lower() for key in environ if key.startswith("HTTP_"))
            allowed = (
                _loopback(environ.get("REMOTE_ADDR"))
                and _local_host(environ.get("HTTP_HOST"))
                and not _proxied(names)
            )
        status, headers, body = page.respond(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("QUERY_STRING", ""),
            environ.get("HTTP_ACCEPT", ""),
            allowed,
        )
        start_response(f"{status} {_REASONS[status]}", headers)
        return [body]

    return threadz


def asgi_app(
    *,
    allow: Callable[[Scope], bool] | None = None,
    stacks: bool = False,
    refresh: float = 2.0,
    threshold: float = DEFAULT_THRESHOLD,
    frames: int = 8,
) -> ASGIApp:
    """Return an ASGI application that shows every thread serving a request: the threadz page.

    The same page as :func:`wsgi_app`'s, for ASGI servers (uvicorn) and
    frameworks (FastAPI, Starlette)::

        from starlette.routing import Mount

        app.router.routes.append(Mount("/threadz", app=threadz.asgi_app()))

    The rows are threads: the worker threads that run sync endpoints and
    ``run_in_threadpool`` calls, and any other thread of the process.  An
    ``async`` endpoint runs on the event loop's thread, which serves one
    task at a time; that thread is the one serving the page's own request,
    which is left out.

    ``allow`` is called with the request's scope; without it, only clients
    on a loopback address (the scope's ``client``) whose request carries no
    forwarding header and names a loopback ``Host`` are answered.  It answers ``lifespan`` events (so it
    can be the server's application too) and refuses websockets.  The other
    options are :func:`wsgi_app`'s.

    .. versionadded:: 0.1.0
    """
    page = _Page(stacks=stacks, refresh=refresh, threshold=threshold, frames=frames)

    async def threadz(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})  # policy violation: pages only
            return
        headers = {bytes(name).decode("latin-1").lower(): bytes(value) for name, value in scope["headers"]}
        if allow is not None:
            allowed = bool(allow(scope))
        else:
            client = scope.get("client")
            host = headers.get("host")
            allowed = (
                _loopback(client[0] if client else None)
                and _local_host(host.decode("latin-1") if host is not None else None)
                and not _proxied(headers)
            )
        status, response_headers, body = page.respond(
            scope["method"],
            bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers.get("accept", b"").decode("latin-1"),
            allowed,
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(name.lower().encode(), value.encode()) for name, value in response_headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return threadz
