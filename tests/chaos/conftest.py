"""The chaos cluster (tests/chaos/cluster.py), one per session: test_chaos.py and test_slo.py
share it (each module leaves it whole, or `revive`s it). Its servers schedule by priority and
export traces to an OTLP/HTTP receiver, its router to an OTLP/gRPC one (tests/chaos/otlp_receiver.py),
both started first and kept for the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.cluster import Chaos, chaos_cluster
from tests.chaos.otlp_receiver import GRPCReceiver, HTTPReceiver, Spans


@pytest.fixture(scope="session")
def otlp_spans() -> Iterator[tuple[Spans, str, str]]:
    """(the spans received, the servers' endpoint (HTTP), the router's (gRPC))."""
    spans = Spans()
    http, grpc = HTTPReceiver(spans), GRPCReceiver(spans)
    try:
        yield spans, http.url, grpc.endpoint
    finally:
        http.stop()
        grpc.stop()


@pytest.fixture(scope="session")
def chaos(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path,
          otlp_spans: tuple[Spans, str, str]) -> Iterator[Chaos]:
    _, server_endpoint, router_endpoint = otlp_spans
    args = ["--enable-priority-scheduling", "--enable-trace", "--otlp-traces-endpoint", server_endpoint]
    with chaos_cluster(tmp_path_factory.mktemp("chaos"), args, enable_trace=True,
                       otlp_traces_endpoint=router_endpoint) as c:
        yield c
