"""How the planner acts on a cluster: the `Connector` interface, and `LocalConnector` (this machine).

A connector answers four calls; the live planner (live.py) calls them from one thread, one
action at a time, and logs every result:

    workers() -> list[WorkerView]       the prefill and decode workers serving now (url, role,
                                         in flight, whether this connector started it)
    switch(url, role) -> ActionResult    a live role switch of a running worker
    start(role) -> ActionResult          a new worker of that role (may return before it serves:
                                         `starting()` counts it until it shows in workers())
    stop(url) -> ActionResult            drain a worker, then end it (only one it started)
    starting() -> dict[role, int]        workers started and not yet serving
    close()                              whatever it holds (LocalConnector: stops what it started)

Another deployment plugs in the same way (a Kubernetes connector would patch a Deployment's
replicas or a pod's role label; `switch` may be unsupported there: ActionResult(ok=False)).

`LocalConnector` drives pdserve's own HTTP API: the worker list is the router's `GET /workers`
(with --discovery the router's set is what etcd holds), `switch` is the worker's `POST
/switch_role`, `stop` its `POST /drain` then SIGTERM (and the process group killed after a
bounded wait), `start` runs `python -m pdserve.cli serve` on a free port of 127.0.0.1 with the
role, a free bootstrap port (a decode may switch to prefill later), `--discovery` (how it joins
the router) and the `serve_args` given (model, engine flags), logging to `log_dir`.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pdserve.flags.procs import kill_group
from pdserve.planner.actions import ROLES, WorkerView
from pdserve.planner.scrape import http_get

logger = logging.getLogger("pdserve.planner")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    seconds: float
    detail: dict[str, Any]  # the worker's report (a switch: drain_s, swap_s, epoch...), or {"error": ...}


class Connector(Protocol):
    def workers(self) -> list[WorkerView]: ...
    def switch(self, url: str, role: str) -> ActionResult: ...
    def start(self, role: str) -> ActionResult: ...
    def stop(self, url: str) -> ActionResult: ...
    def starting(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")[:500]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalConnector:
    def __init__(self, router_url: str, api_key: str | None = None, discovery: str | None = None,
                 serve_args: list[str] | None = None, log_dir: Path | None = None, action_timeout_s: float = 300.0,
                 command: list[str] | None = None) -> None:
        self.router_url = router_url.rstrip("/")
        self.api_key = api_key
        self.discovery = discovery
        self.serve_args = serve_args or []
        self.log_dir = log_dir
        self.timeout = action_timeout_s
        self.command = command or [sys.executable, "-m", "pdserve.cli", "serve"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # url -> a worker this connector started
        self._starting: dict[str, str] = {}  # url -> role, until it shows in the router's list

    @property
    def can_start(self) -> bool:
        return self.discovery is not None  # a started worker joins the router through etcd

    def workers(self) -> list[WorkerView]:
        listed = json.loads(http_get(self.router_url + "/workers", self.api_key))["workers"]
        views = [WorkerView(w["url"], w["role"], int(w.get("in_flight", 0)), w["url"] in self.procs)
                 for w in listed if w.get("role") in ROLES and w.get("healthy") and not w.get("stale")]
        for v in views:
            self._starting.pop(v.url, None)
        for url in [u for u, p in self.procs.items() if p.poll() is not None]:
            logger.warning("worker %s exited with %s", url, self.procs.pop(url).returncode)
            self._starting.pop(url, None)
        return views

    def starting(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for role in self._starting.values():
            out[role] += 1
        return out

    def switch(self, url: str, role: str) -> ActionResult:
        t0 = time.monotonic()
        status, body = post_json(url + "/switch_role", {"role": role, "timeout_s": self.timeout}, self.api_key,
                                 self.timeout + 30)
        return ActionResult(status == 200, time.monotonic() - t0, body)

    def start(self, role: str) -> ActionResult:
        if not self.can_start:
            return ActionResult(False, 0.0, {"error": "starting workers needs --discovery (how they join the router)"})
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [*self.command, "--host", "127.0.0.1", "--port", str(port), "--disaggregation-mode", role,
               "--disaggregation-bootstrap-port", str(free_port()), "--discovery", str(self.discovery),
               *self.serve_args]
        log = open(self.log_dir / f"worker-{port}.log", "wb") if self.log_dir else subprocess.DEVNULL
        try:
            self.procs[url] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own descriptor
        self._starting[url] = role
        logger.info("started a %s worker at %s (pid %d)", role, url, self.procs[url].pid)
        return ActionResult(True, 0.0, {"url": url, "pid": self.procs[url].pid})

    def stop(self, url: str) -> ActionResult:
        t0 = time.monotonic()
        proc = self.procs.get(url)
        if proc is None:
            return ActionResult(False, 0.0, {"error": f"{url} was not started by this planner"})
        status, body = post_json(url + "/drain", {"timeout_s": self.timeout}, self.api_key, self.timeout + 30)
        self._end(url)
        return ActionResult(status == 200, time.monotonic() - t0, body)

    def _end(self, url: str, wait_s: float = 30.0) -> None:
        proc = self.procs.pop(url)
        self._starting.pop(url, None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc)

    def close(self) -> None:
        for url in list(self.procs):
            self._end(url, 10.0)
