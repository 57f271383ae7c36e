"""OpenTelemetry traces of pdserve's requests (servers and router), with no cost when off.

    off (default)   `NoTracer`: every call does nothing; nothing of the OpenTelemetry SDK or an
                    exporter is imported (this module imports the standard library only)
    on              `make_tracer(service, endpoint)` (`--enable-trace --otlp-traces-endpoint`):
                    an SDK TracerProvider whose BatchSpanProcessor exports off the request path,
                    every 0.5 s, to `endpoint`: `http://HOST:PORT[/path]` is OTLP over
                    HTTP/protobuf (path default /v1/traces), `HOST:PORT` OTLP over gRPC

One trace per request, parented across processes by the W3C `traceparent` header:

    router:   pdserve.router (root, or the client's traceparent's child) ── router pick
              the legs carry the router span's traceparent, both at once (PD: prefill and decode)
    prefill:  pdserve.prefill ── prefill queue, prefill forward, KV transfer
    decode:   pdserve.decode  ── decode queue (prealloc + its KV on the way), decode
    unified:  pdserve.server  ── prefill queue, prefill forward, decode

Spans are built when a request ends, from timestamps (the engine's phase times reach the front
in the request's last TokenOut): `begin(name, parent, start_ns, attrs)` opens a span whose
`traceparent` the legs carry and `end(end_ns)` closes it; `span(name, parent, start_ns, end_ns,
attrs)` records a finished child. Every span carries `pdserve.request_id`. Needs the optional
extra `pdserve[trace]` (opentelemetry-sdk and the OTLP exporters).
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

Attrs = dict[str, "str | int | float | bool"]
TRACEPARENT = "traceparent"  # W3C trace context header


class Span(Protocol):
    @property
    def traceparent(self) -> str | None:
        """The header value that makes another process's span a child of this one."""
        ...

    def end(self, end_ns: int) -> None: ...


class Tracer(Protocol):
    enabled: bool

    def begin(self, name: str, parent: Span | str | None, start_ns: int, attrs: Attrs) -> Span: ...
    def span(self, name: str, parent: Span | str | None, start_ns: int, end_ns: int, attrs: Attrs) -> None: ...
    def close(self) -> None: ...


class _NoSpan:
    traceparent = None

    def end(self, end_ns: int) -> None:
        pass


_NO_SPAN = _NoSpan()


class NoTracer:
    """Tracing off: nothing is recorded, nothing imported."""

    enabled = False

    def begin(self, name: str, parent: Span | str | None, start_ns: int, attrs: Attrs) -> Span:
        return _NO_SPAN

    def span(self, name: str, parent: Span | str | None, start_ns: int, end_ns: int, attrs: Attrs) -> None:
        pass

    def close(self) -> None:
        pass


class _OtelSpan:
    __slots__ = ("_tp", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self._tp: str | None = None

    @property
    def traceparent(self) -> str | None:
        if self._tp is None:
            ctx = self.span.get_span_context()
            self._tp = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        return self._tp

    def end(self, end_ns: int) -> None:
        self.span.end(end_time=end_ns)


def exporter_for(endpoint: str) -> Any:
    """The OTLP span exporter for `endpoint` (see the module docstring)."""
    if endpoint.startswith(("http://", "https://")):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        parts = urlsplit(endpoint)
        url = endpoint if parts.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"
        return HTTPExporter(endpoint=url, timeout=5)
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--otlp-traces-endpoint {endpoint!r}: expected http://HOST:PORT[/path] or HOST:PORT")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

    return GRPCExporter(endpoint=endpoint, insecure=True, timeout=5)


class OtelTracer:
    """Tracing on: OpenTelemetry SDK spans, exported in the background (module docstring)."""

    enabled = True

    def __init__(self, service: str, endpoint: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter_for(endpoint), schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("pdserve")
        self._kinds = (SpanKind.SERVER, SpanKind.INTERNAL)
        self._in_context = set_span_in_context
        self._propagator = TraceContextTextMapPropagator()

    def _context(self, parent: Span | str | None) -> Any:
        if isinstance(parent, _OtelSpan):
            return self._in_context(parent.span)
        if isinstance(parent, str):
            return self._propagator.extract({TRACEPARENT: parent})
        return None

    def begin(self, name: str, parent: Span | str | None, start_ns: int, attrs: Attrs) -> Span:
        return _OtelSpan(self.tracer.start_span(name, context=self._context(parent), kind=self._kinds[0],
                                                attributes=attrs, start_time=start_ns))

    def span(self, name: str, parent: Span | str | None, start_ns: int, end_ns: int, attrs: Attrs) -> None:
        s = self.tracer.start_span(name, context=self._context(parent), kind=self._kinds[1], attributes=attrs,
                                   start_time=start_ns)
        s.end(end_time=max(end_ns, start_ns))

    def close(self) -> None:
        self.provider.shutdown()  # exports what is left


def make_tracer(service: str, endpoint: str) -> Tracer:
    """The tracer of `--enable-trace` (raises ValueError for a bad endpoint, ImportError without
    the `trace` extra)."""
    return OtelTracer(service, endpoint)
