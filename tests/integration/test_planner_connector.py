"""The local connector's process side (planner/connector.py) without loading a model: the worker it starts is
a tiny stand-in process (the real command's flags, a /drain that answers), the router's /workers a stub.

start() runs the command on a free port with the role, a bootstrap port and --discovery, and counts the
worker as starting until the router lists it; stop() drains it (POST /drain) and ends its process group;
close() ends whatever it still holds; a worker it did not start is never stopped.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdserve.planner.connector import LocalConnector
from tests.mock_worker import wait_until

STAND_IN = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
open(argv[argv.index("--record") + 1], "w").write(json.dumps(argv))
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.dumps({"status": "drained", "seconds": 0.01}).encode()
        self.send_response(200 if self.path == "/drain" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class Router:
    """A stub of the router's GET /workers; `listed` is what it answers."""

    def __init__(self) -> None:
        self.listed: list[dict[str, object]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"workers": outer.listed}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router()
    try:
        yield r
    finally:
        r.server.shutdown()


def test_start_counts_until_listed_stop_drains_and_ends_it(router: Router, tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    conn = LocalConnector(router.url, discovery="etcd://127.0.0.1:2379/x", serve_args=["--record", str(record)],
                          log_dir=tmp_path, command=[sys.executable, "-c", STAND_IN])
    try:
        started = conn.start("decode")
        assert started.ok
        url = str(started.detail["url"])
        proc = conn.procs[url]
        assert conn.starting() == {"prefill": 0, "decode": 1} and conn.workers() == []
        wait_until(record.exists, 10, "the stand-in started")
        argv = json.loads(record.read_text())
        assert argv[argv.index("--disaggregation-mode") + 1] == "decode"
        assert argv[argv.index("--discovery") + 1] == "etcd://127.0.0.1:2379/x"
        assert "--disaggregation-bootstrap-port" in argv and url.endswith(argv[argv.index("--port") + 1])
        router.listed = [{"url": url, "role": "decode", "healthy": True, "in_flight": 2},
                         {"url": "http://127.0.0.1:1", "role": "prefill", "healthy": True}]
        wait_until(lambda: any(w.url == url for w in conn.workers()), 10, "listed by the router")
        views = {w.url: w for w in conn.workers()}
        assert views[url].owned and views[url].in_flight == 2 and not views["http://127.0.0.1:1"].owned
        assert conn.starting() == {"prefill": 0, "decode": 0}
        assert not conn.stop("http://127.0.0.1:1").ok  # not its own
        stopped = conn.stop(url)
        assert stopped.ok and stopped.detail["status"] == "drained"
        assert proc.poll() is not None and url not in conn.procs
        again = conn.start("prefill")
        assert again.ok and conn.starting()["prefill"] == 1
    finally:
        conn.close()
    assert not conn.procs
    assert not LocalConnector(router.url).start("decode").ok  # no --discovery: a started worker could not join
