"""A prefill + decode pair of real `pdserve serve` processes on 127.0.0.1, and PD requests to it.

    pair = PDPair(tmp_path, backend="tcp", args=[...], prefill_env={...})
    pair.start()                       # both processes at once; bounded wait for both /health
    res = pair.request("/generate", body, stream=False)   # same body + bootstrap fields to both, at once
    res.prefill.status, res.decode.json, res.decode.events ...
    pair.kill_decode(); pair.start_decode(extra_args)      # kill -9 the whole process group, restart
    pair.settled()                     # both healthy, idle, pools back at their marks (taken at start)
    pair.stop()                        # always (the fixture's finally): SIGTERM, then SIGKILL the group

A PD request is one body sent to both servers in parallel with `bootstrap_host`,
`bootstrap_port` (the prefill's bootstrap port) and `bootstrap_room` (a random 63-bit int) added,
as a router does. The prefill answers one token, the decode the real answer. `Reply` holds one
side's answer: status and JSON (non-streaming) or the parsed SSE events (streaming), and
`error`, the OpenAI error object if the side failed (a 4xx/5xx body, or an error frame in a
stream), or None. A side whose connection broke (its server was killed) has status None.

Pools: `pool_mark(url)` is (free + cached pages, used pages) from /get_load; `wait_settled`
waits (bounded) until a server has nothing running, waiting or in flight and its pool is back
at a mark (free + cached equal, nothing used).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import httpx

from pdserve.flags.procs import kill_group
from tests.integration.conftest import ServerProcess, free_port

PD_TIMEOUT_S = 120.0  # one PD request, end to end (bounded: a hang fails the test, never blocks it)


@dataclass
class Reply:
    status: int | None = None  # None: the connection broke (server killed) or timed out
    json: Any = None  # non-streaming body
    events: list[Any] = field(default_factory=list)  # streaming: parsed `data:` frames, without [DONE]
    done: bool = False  # streaming: saw [DONE]
    exc: str | None = None  # why status is None
    elapsed: float = 0.0

    @property
    def error(self) -> dict[str, Any] | None:
        if isinstance(self.json, dict) and isinstance(self.json.get("error"), dict):
            return self.json["error"]
        for ev in self.events:
            if isinstance(ev, dict) and isinstance(ev.get("error"), dict):
                return ev["error"]
        return None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def final(self) -> Any:
        """Non-streaming: the body. Streaming: the last event (native /generate: cumulative)."""
        return self.json if not self.events else self.events[-1]

    def describe(self) -> str:
        body = self.json if self.json is not None else self.events[-3:]
        return f"status={self.status} exc={self.exc} body={json.dumps(body)[:600]}"


@dataclass
class PDResult:
    prefill: Reply
    decode: Reply
    room: int


def clean_error(reply: Reply) -> bool:
    """A failure the client can read: an OpenAI error object with a message and a 5xx/4xx type."""
    err = reply.error
    return (err is not None and isinstance(err.get("message"), str) and err["message"] != ""
            and isinstance(err.get("type"), str)
            and (reply.status is not None and (reply.status >= 400 or bool(reply.events))))


async def call(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], stream: bool,
               timeout: float = PD_TIMEOUT_S) -> Reply:
    """One HTTP request; never raises for HTTP or connection failures (they land in the Reply)."""
    reply = Reply()
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            if not stream:
                r = await client.post(url + path, json=body)
                reply.status = r.status_code
                try:
                    reply.json = r.json()
                except ValueError:
                    reply.json = r.text
            else:
                async with client.stream("POST", url + path, json={**body, "stream": True}) as r:
                    reply.status = r.status_code
                    if r.status_code != 200:
                        raw = await r.aread()
                        try:
                            reply.json = json.loads(raw)
                        except ValueError:
                            reply.json = raw.decode(errors="replace")
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                reply.done = True
                                continue
                            reply.events.append(json.loads(line[6:]))
    except (httpx.HTTPError, TimeoutError) as exc:
        reply.status = None
        reply.exc = f"{type(exc).__name__}: {exc}"
    reply.elapsed = time.monotonic() - t0
    return reply


def new_room(rng: random.Random | None = None) -> int:
    return (rng or random).getrandbits(63)


class PDPair:
    def __init__(self, tmp: Path, backend: str, args: list[str], *, prefill_env: dict[str, str] | None = None,
                 decode_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.backend = backend
        self.args = list(args)
        self.prefill_env = dict(prefill_env or {})
        self.decode_env = dict(decode_env or {})
        self.bootstrap_port = free_port()
        self.prefill: ServerProcess | None = None
        self.decode: ServerProcess | None = None
        self.marks: dict[str, int] = {}  # role -> free + cached pages when it started (see `mark`)
        self._starts = 0

    # --- processes ----------------------------------------------------------------------------

    def _log(self, role: str) -> Path:
        self._starts += 1
        return self.tmp / f"{role}-{self._starts}.log"

    def launch_prefill(self, extra: list[str] | None = None, env: dict[str, str] | None = None,
                       port: int | None = None) -> ServerProcess:
        """Start the prefill (`port`: at that HTTP port, e.g. the one it had before a kill)."""
        assert self.prefill is None or self.prefill.proc.poll() is not None, "prefill still running"
        args = [*self.args, "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", self.backend,
                "--disaggregation-bootstrap-port", str(self.bootstrap_port), *(extra or [])]
        self.prefill = ServerProcess(args, self._log("prefill"), env={**self.prefill_env, **(env or {})}, port=port)
        return self.prefill

    def launch_decode(self, extra: list[str] | None = None, env: dict[str, str] | None = None,
                      port: int | None = None) -> ServerProcess:
        assert self.decode is None or self.decode.proc.poll() is not None, "decode still running"
        args = [*self.args, "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", self.backend,
                "--disaggregation-bootstrap-port", str(free_port()), *(extra or [])]
        self.decode = ServerProcess(args, self._log("decode"), env={**self.decode_env, **(env or {})}, port=port)
        return self.decode

    def launch_extra_decode(self, tag: str, port: int | None = None) -> ServerProcess:
        """Another decode server on the same prefill (a mixed fleet; `port`: at that HTTP port, e.g.
        the one it had before a kill); the caller stops it."""
        args = [*self.args, "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", self.backend,
                "--disaggregation-bootstrap-port", str(free_port())]
        return ServerProcess(args, self._log(f"decode-{tag}"), env=self.decode_env, port=port)

    def start(self) -> PDPair:
        self.launch_prefill()
        self.launch_decode()
        self.wait_healthy()
        self.mark()
        return self

    def wait_healthy(self) -> None:
        for server in (self.prefill, self.decode):
            assert server is not None
            server.wait_healthy()

    def start_decode(self, extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """(Re)start the decode server (after kill_decode) and mark its pool."""
        self.launch_decode(extra, env).wait_healthy()
        self.mark("decode")

    def start_prefill(self, extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """(Re)start the prefill server on the same bootstrap port and mark its pool."""
        self.launch_prefill(extra, env).wait_healthy()
        self.mark("prefill")

    @staticmethod
    def kill(server: ServerProcess | None) -> None:
        """kill -9 the server's whole process group (front and engine process), bounded."""
        if server is None:
            return
        kill_group(server.proc, wait_s=10)
        server.stop(timeout=5)  # reaps, closes the log

    def kill_decode(self) -> None:
        self.kill(self.decode)

    def kill_prefill(self) -> None:
        self.kill(self.prefill)

    def stop(self) -> None:
        for server in (self.decode, self.prefill):
            if server is not None:
                server.stop(timeout=15)

    def mark(self, *roles: str) -> None:
        """Remember the pools of `roles` (default both) as they are now: `settled` compares with it."""
        for role in roles or ("prefill", "decode"):
            self.marks[role] = pool_mark(self.server(role).url)

    def settled(self, timeout: float = 30.0) -> None:
        """Both servers healthy, idle (PD queues included) and their pools back at their marks."""
        for role in ("prefill", "decode"):
            url = self.server(role).url
            assert healthy(url), f"{role} is not healthy\n{self.logs()}"
            wait_settled(url, self.marks[role], timeout)

    def server(self, role: str) -> ServerProcess:
        server = self.prefill if role == "prefill" else self.decode
        assert server is not None, f"no {role} server"
        return server

    def logs(self) -> str:
        out = []
        for name, server in (("prefill", self.prefill), ("decode", self.decode)):
            if server is not None:
                out.append(f"--- {name} ({server.log_path}) ---\n{server.log_tail(40)}")
        return "\n".join(out)

    # --- requests -----------------------------------------------------------------------------

    @property
    def urls(self) -> tuple[str, str]:
        assert self.prefill is not None and self.decode is not None
        return self.prefill.url, self.decode.url

    def pd_body(self, body: dict[str, Any], room: int | None = None) -> dict[str, Any]:
        return {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": new_room() if room is None else room}

    async def arequest(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], stream: bool = False,
                       room: int | None = None, timeout: float = PD_TIMEOUT_S) -> PDResult:
        full = self.pd_body(body, room)
        pre, dec = self.urls
        p, d = await asyncio.gather(call(client, pre, path, full, stream, timeout),
                                    call(client, dec, path, full, stream, timeout))
        return PDResult(p, d, full["bootstrap_room"])

    async def send_both(self, full: dict[str, Any], path: str = "/generate", stream: bool = False,
                        timeout: float = PD_TIMEOUT_S) -> PDResult:
        """`full` (already carrying its bootstrap fields) to both servers at once, own client."""
        pre, dec = self.urls
        async with httpx.AsyncClient(timeout=timeout) as client:
            p, d = await asyncio.gather(call(client, pre, path, full, stream, timeout),
                                        call(client, dec, path, full, stream, timeout))
        return PDResult(p, d, full["bootstrap_room"])

    def request(self, path: str, body: dict[str, Any], stream: bool = False, room: int | None = None,
                timeout: float = PD_TIMEOUT_S) -> PDResult:
        async def run() -> PDResult:
            async with httpx.AsyncClient(timeout=timeout) as client:
                return await self.arequest(client, path, body, stream, room, timeout)

        return asyncio.run(run())

    def many(self, items: list[tuple[str, dict[str, Any], bool]], concurrency: int,
             rooms: list[int] | None = None, timeout: float = PD_TIMEOUT_S) -> list[PDResult]:
        """PD requests (path, body, stream), at most `concurrency` at a time; results in order."""
        async def run() -> list[PDResult]:
            sem = asyncio.Semaphore(concurrency)
            limits = httpx.Limits(max_connections=2 * concurrency + 8, max_keepalive_connections=2 * concurrency)
            async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
                async def one(i: int) -> PDResult:
                    path, body, stream = items[i]
                    async with sem:
                        return await self.arequest(client, path, body, stream,
                                                   rooms[i] if rooms is not None else None, timeout)

                return await asyncio.gather(*(one(i) for i in range(len(items))))

        return asyncio.run(run())


# --- load and pools ---------------------------------------------------------------------------------


def get_load(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/get_load", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def pool_mark(url: str) -> int:
    """Pages that are not held by any request: free + cached."""
    load = get_load(url)
    return load["free_pages"] + load["cached_pages"]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_settled(url: str, mark: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until `url` is idle (nothing running, waiting — PD queues included — or in flight,
    no page in use) with free + cached pages back at `mark`; returns the last /get_load."""
    deadline = time.monotonic() + timeout
    load: dict[str, Any] = {}
    while time.monotonic() < deadline:
        load = get_load(url)
        if (load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0 and load["num_in_flight"] == 0
                and load["used_pages"] == 0 and load["free_pages"] + load["cached_pages"] == mark):
            assert load["integrity_errors"] == 0, load
            return load
        time.sleep(0.2)
    raise AssertionError(f"{url} did not settle within {timeout} s (pool mark {mark}): {load}")


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def running_pair(tmp: Path, backend: str, args: list[str], **env: dict[str, str] | None) -> Iterator[PDPair]:
    """A started PDPair for a fixture; prints both servers' logs if the block fails; always stops."""
    p = PDPair(tmp, backend, args, **env)
    try:
        p.start()
        yield p
    except BaseException:
        print(p.logs())
        raise
    finally:
        p.stop()
