"""gRPC interceptors: each call runs in its caller's context, with a request id.

For a server made with ``grpc.server(ThreadPoolExecutor(...))``::

    import threadctx.grpc

    server = grpc.server(executor, interceptors=[threadctx.grpc.server_interceptor()])

and for a channel that OpenTelemetry's gRPC client instrumentation does not
cover::

    channel = grpc.intercept_channel(channel, threadctx.grpc.client_interceptor())

gRPC calls a server interceptor's ``intercept_service`` on its polling
thread, not on the pool thread that then runs the handler: binding there
binds the wrong thread. :func:`server_interceptor` wraps the handler itself,
so that the context is attached on the pool thread for exactly as long as
the handler (or each step of its response stream) runs.

Beside ``opentelemetry-instrumentation-grpc``, list the interceptors in
either order: with OpenTelemetry's outside, the handler runs under its
SERVER span and this interceptor reads only the baggage and the request id;
with it inside, this one extracts the caller's trace context and
OpenTelemetry's SERVER span starts under it, from the same ``traceparent``.

``grpc.aio`` servers are not covered: their handlers are coroutines on the
event loop (see the gRPC how-to).

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from typing import Any, NamedTuple, cast

try:
    import grpc
except ImportError as error:  # pragma: no cover - the test group installs grpcio
    raise ImportError(
        "threadctx.grpc needs grpcio: pip install 'threadctx[grpc]' (or pip install grpcio)"
    ) from error

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from threadctx._compat import OTEL_GRPC_SERVER, rewrap_otel_grpc_behavior
from threadctx._correlation import correlation, validate
from threadctx._propagation import inject
from threadctx._requests import (
    REQUEST_ID,
    Body,
    RequestPolicy,
    check_header_name,
    names_carry_context,
    new_request_id,
)

__all__ = ["client_interceptor", "new_request_id", "server_interceptor"]

Metadata = Sequence[tuple[str, "str | bytes"]]
_Headers = dict[str, list[str]]
_Streaming = Callable[[Any, "grpc.ServicerContext"], Iterator[Any]]


class _HeadersGetter(Getter[_Headers]):
    """Reads the text metadata of one call, gathered once by lowercase key."""

    def get(self, carrier: _Headers, key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: _Headers) -> list[str]:
        return list(carrier)


_GETTER = _HeadersGetter()


def _text_metadata(metadata: Metadata | None) -> _Headers:
    """The call's text metadata by lowercase key (``-bin`` values are bytes: left out)."""
    headers: _Headers = {}
    for key, value in metadata or ():
        if isinstance(key, str) and isinstance(value, str):
            headers.setdefault(key.lower(), []).append(value)
    return headers


def server_interceptor(
    *,
    header: str = "X-Request-ID",
    name: str = "request_id",
    generate: Callable[[], str] = new_request_id,
    trust_incoming: bool = True,
    response_header: bool = True,
) -> grpc.ServerInterceptor:
    """A server interceptor that runs each handler in its caller's context, with a request id.

    For each call (unary or streaming, in either direction), on the pool
    thread that runs the handler:

    1. the caller's trace context and allowlisted baggage are extracted from
       the metadata (:func:`threadctx.extract`); when OpenTelemetry's server
       interceptor is outside this one, its SERVER span is kept and only the
       baggage is read;
    2. the request id is the ``x-request-id`` metadata under the same rule as
       the HTTP middlewares (:class:`threadctx.wsgi.ContextMiddleware`): taken
       if valid, else from the incoming baggage if it passes the same rule,
       else generated; an invalid one is counted in
       :func:`threadctx.propagation_stats` and never echoed;
    3. it is bound as a correlation ID while the handler runs (and while each
       message of a response stream is produced), and sent back in the
       initial metadata, beside what the handler sends there itself (a
       request id the handler sends is kept);
    4. the pool thread gets its own context back afterwards, and gRPC's
       polling thread is never touched.

    Args:
        header: the metadata key of the request id, in and out (sent in lowercase, as gRPC requires).
        name: the correlation ID name it is bound under.
        generate: makes a request id when the call brings no valid one; an
            id it makes that breaks the rule is a ``ValueError``.
        trust_incoming: ``False`` ignores incoming request ids (metadata and
            baggage) and always generates one.
        response_header: ``False`` does not send the request id back.

    Raises:
        ValueError: ``header`` or ``name`` is invalid.

    .. versionadded:: 0.1.0
    """
    _metadata_key(header)
    policy = RequestPolicy(
        header=header,
        name=name,
        generate=generate,
        trust_incoming=trust_incoming,
        response_header=response_header,
    )
    return _ServerInterceptor(policy)


class _ServerInterceptor(grpc.ServerInterceptor):
    """Wraps each method handler's behaviour: nothing runs on the polling thread but the wrapping."""

    def __init__(self, policy: RequestPolicy) -> None:
        self.policy = policy

    def __repr__(self) -> str:
        return f"threadctx.grpc.server_interceptor(header={self.policy.header!r}, name={self.policy.name!r})"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming:
            name = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            name = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior: Callable[[Any, grpc.ServicerContext], Any] | None = getattr(handler, name)
        if behavior is None:  # a handler that does not say what it runs: left to gRPC
            return handler
        policy = self.policy
        wrap = _streaming if handler.response_streaming else _unary
        # OpenTelemetry's interceptor inside this one would extract the caller's context from the
        # metadata into a fresh context, dropping the request id: go inside it instead.
        wrapped = _inside_opentelemetry(behavior, lambda inner: wrap(inner, policy)) or wrap(behavior, policy)
        factory: Callable[..., grpc.RpcMethodHandler[Any, Any]] = getattr(grpc, f"{name}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_outside_warned = False


def _inside_opentelemetry(
    behavior: Callable[..., Any], wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[..., Any] | None:
    """OpenTelemetry's handler wrapper with ``wrap`` inside it, if ``behavior`` is one.

    Where OpenTelemetry's wrapper is not one that can be rebuilt (a release
    changed it), a warning says to list this interceptor after
    OpenTelemetry's, and the call is served as before.
    """
    global _outside_warned  # noqa: PLW0603 - one warning per process
    if getattr(behavior, "__module__", None) != OTEL_GRPC_SERVER:
        return None
    rebuilt = rewrap_otel_grpc_behavior(behavior, wrap)
    if rebuilt is None and not _outside_warned:
        _outside_warned = True
        warnings.warn(
            "threadctx.grpc.server_interceptor() is listed before OpenTelemetry's server interceptor, "
            "which replaces the context it binds: list it after OpenTelemetry's",
            stacklevel=2,
        )
    return rebuilt


def _enter(policy: RequestPolicy, servicer_context: grpc.ServicerContext) -> tuple[Context, _Servicer]:
    headers = _text_metadata(servicer_context.invocation_metadata())
    context, request_id = policy.enter(headers, _GETTER, names_carry_context(headers.keys()))
    echo = (policy.header.lower(), request_id) if policy.response_header else None
    return context, _Servicer(servicer_context, echo)


def _as_context(servicer: _Servicer) -> grpc.ServicerContext:
    return cast("grpc.ServicerContext", servicer)  # registered as one: a proxy of the real one


def _unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any], policy: RequestPolicy
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def in_context(request: Any, servicer_context: grpc.ServicerContext) -> Any:
        context, servicer = _enter(policy, servicer_context)
        token = otel_context.attach(context)
        try:
            return behavior(request, _as_context(servicer))
        finally:
            otel_context.detach(token)
            servicer.echo()

    return in_context


def _streaming(behavior: _Streaming, policy: RequestPolicy) -> _Streaming:
    def in_context(request: Any, servicer_context: grpc.ServicerContext) -> Iterator[Any]:
        context, servicer = _enter(policy, servicer_context)
        # Each step in the call's context, the pool thread's own restored in between, as for a WSGI
        # body: what the handler or an inner interceptor attaches stays theirs for the next step,
        # and a stream that gRPC abandons (the client cancelled) leaves nothing attached.
        return _echoing(Body(_Call(behavior, request, servicer), context), servicer)

    return in_context


class _Call:
    """A streaming handler's call, made when its stream is first iterated, and closed with the stream."""

    __slots__ = ("behavior", "iterator", "request", "servicer")

    def __init__(
        self,
        behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
        request: Any,
        servicer: _Servicer,
    ) -> None:
        self.behavior = behavior
        self.request = request
        self.servicer = servicer
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        self.iterator = iter(self.behavior(self.request, _as_context(self.servicer)))
        return self.iterator

    def close(self) -> None:
        """Close the handler's generator (its ``finally`` runs now, in the call's context: see Body)."""
        close: Callable[[], Any] | None = getattr(self.iterator, "close", None)
        if close is not None:
            close()


def _echoing(body: Body, servicer: _Servicer) -> Iterator[Any]:
    """The stream's messages, the request id sent before the first (or with the status)."""
    try:
        for message in body:
            servicer.echo()
            yield message
    finally:
        body.close()
        servicer.echo()


class _Servicer:
    """The handler's ``ServicerContext``, adding the request id to the initial metadata.

    Every other attribute is the wrapped context's own.
    """

    __slots__ = ("_echo", "_wrapped")

    def __init__(self, wrapped: grpc.ServicerContext, echo: tuple[str, str] | None) -> None:
        self._wrapped = wrapped
        self._echo = echo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        """Send the handler's initial metadata, with the request id unless it has its own."""
        echo, self._echo = self._echo, None
        metadata = list(initial_metadata)
        if echo is not None and all(str(key).lower() != echo[0] for key, _ in metadata):
            metadata.append(echo)
        self._wrapped.send_initial_metadata(tuple(metadata))

    def echo(self) -> None:
        """Send the request id now, unless it was sent (or the handler sent its initial metadata)."""
        echo, self._echo = self._echo, None
        if echo is not None:
            # Too late only if the call is over (cancelled): there is nobody to tell.
            with suppress(ValueError, RuntimeError, grpc.RpcError):
                self._wrapped.send_initial_metadata((echo,))


grpc.ServicerContext.register(_Servicer)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Metadata | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def client_interceptor(
    *, header: str | None = "X-Request-ID", name: str = "request_id"
) -> _ClientInterceptor:
    """A client interceptor that sends the current context with each call.

    For channels without OpenTelemetry's gRPC client instrumentation::

        channel = grpc.intercept_channel(grpc.insecure_channel(target), threadctx.grpc.client_interceptor())

    Each call (unary or streaming) sends what :func:`threadctx.inject` writes
    (the trace context through OpenTelemetry's configured propagators, the
    allowlisted correlation IDs as W3C baggage) and the bound request id in
    ``x-request-id`` if it passes the request-id rule. Metadata the caller
    passed is never replaced.

    Args:
        header: the metadata key of the request id; ``None`` sends none.
        name: the correlation ID name the request id is bound under.

    Raises:
        ValueError: ``header`` or ``name`` is invalid.

    .. versionadded:: 0.1.0
    """
    validate(name, "")
    return _ClientInterceptor(_metadata_key(header) if header is not None else None, name)


def _metadata_key(header: str) -> str:
    """``header`` as a metadata key (lowercase) if it may carry a request id; gRPC reserves ``grpc-``."""
    key = check_header_name(header, "header").lower()
    if key.startswith("grpc-"):
        raise ValueError(f"header {header!r} is reserved by gRPC (grpc-*); choose another")
    return key


class _ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the current context to each call's metadata (see :func:`client_interceptor`)."""

    def __init__(self, header: str | None, name: str) -> None:
        self._header = header
        self._name = name

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = list(details.metadata or ())
        present = {str(key).lower() for key, _ in metadata}
        outgoing: dict[str, str] = {}
        inject(outgoing)
        if self._header is not None:
            request_id = correlation().get(self._name)
            if request_id is not None and REQUEST_ID.fullmatch(request_id):
                outgoing[self._header] = request_id
        for name, value in outgoing.items():
            key = name.lower()  # gRPC refuses uppercase keys; some propagators' headers have them
            if key not in present:  # once: a propagator may have written the request id's header too
                present.add(key)
                metadata.append((key, value))
        return _CallDetails(
            details.method,
            details.timeout,
            tuple(metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Send a unary call with the current context."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Send a response-streaming call with the current context."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Send a request-streaming call with the current context."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Send a bidirectional streaming call with the current context."""
        return continuation(self._details(client_call_details), request_iterator)
