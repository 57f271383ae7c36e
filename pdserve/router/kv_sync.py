"""Subscribers that keep router/kv_index.py current from the workers' KV events (pyzmq asyncio).

Lifecycle: `KVSync.run()` (a task of the app, started when a policy or conditional PD uses the
index) looks at the registry every 0.5 s; a worker whose `/server_info` advertises
`kv_events_endpoint` gets a subscriber task, a removed worker loses its task and its index.
A subscriber: connects a SUB socket to the endpoint (a wildcard host is replaced by the
worker's), waits briefly for the subscription to reach the publisher, takes
`GET /kv_events/snapshot` (resync), then applies batches in seq order; a seq gap (lost batches:
the router was slow, or it was down), a restarted publisher (seq back at 1) or an undecodable
batch triggers a new snapshot. Silence for SILENCE_S (no heartbeat) unindexes the worker and
re-reads its /server_info (a restarted worker may publish on a new port: resubscribe there),
then resyncs. A snapshot that fails (the worker is down) is retried every 0.5 s; until it
succeeds the worker is not indexed and the policies use their approximate tree for it. A router restart starts
from snapshots, so events published while it was down are recovered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from pdserve.kv_events import KVSnapshot, decode_batch, seq_of
from pdserve.router.health import get_server_info
from pdserve.router.kv_index import KVIndex, WorkerIndex
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("pdserve.router")
SCAN_INTERVAL_S = 0.5
JOIN_DELAY_S = 0.1  # a SUB socket's subscription takes a moment to reach the PUB side
SILENCE_S = 5.0  # publishers send at least a heartbeat a second; this much silence means trouble
_snap_decoder = msgspec.json.Decoder(KVSnapshot)


def subscribe_address(endpoint: str, worker: Worker) -> str:
    for wild in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wild):
            return f"tcp://{worker.host}:{endpoint[len(wild):]}"
    return endpoint


class KVSync:
    def __init__(self, registry: WorkerRegistry, index: KVIndex, session: Callable[[], aiohttp.ClientSession],
                 api_key: str | None, timeout_s: float, on_resync: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.index = index
        self.session = session
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.on_resync = on_resync
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.zctx = zmq.asyncio.Context()

    async def run(self) -> None:
        try:
            while True:
                self.scan()
                await asyncio.sleep(SCAN_INTERVAL_S)
        finally:
            for task in self.tasks.values():
                task.cancel()
            for task in self.tasks.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.zctx.term()

    def scan(self) -> None:
        live = {w.url: w for w in self.registry.all()}
        for url in [u for u in self.tasks if u not in live]:
            self.tasks.pop(url).cancel()
            self.index.remove(url)
        for url, w in live.items():
            endpoint = w.info.kv_events_endpoint if w.info is not None else None
            if url not in self.tasks and endpoint:
                self.tasks[url] = asyncio.create_task(self.follow(w, subscribe_address(endpoint, w)),
                                                      name=f"kv-events {url}")

    async def snapshot(self, w: Worker) -> KVSnapshot:
        async with self.session().get(w.url + "/kv_events/snapshot", headers=self.headers,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"snapshot answered {resp.status}")
            return _snap_decoder.decode(await resp.read())

    async def resync(self, w: Worker, idx: WorkerIndex) -> None:
        while True:
            try:
                idx.load(await self.snapshot(w))
                idx.resyncs += 1
                if self.on_resync is not None:
                    self.on_resync(w.url)
                logger.debug("kv index of %s resynced at seq %d (%d blocks)", w.url, idx.seq, len(idx.hashes))
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError, msgspec.DecodeError) as exc:
                logger.debug("kv snapshot of %s failed: %s", w.url, exc)
                await asyncio.sleep(SCAN_INTERVAL_S)

    async def endpoint_now(self, w: Worker) -> str | None:
        """The worker's current endpoint from a fresh /server_info (a restart may change its port)."""
        info = await get_server_info(self.session(), w.url, self.headers, self.timeout_s)
        endpoint = info.kv_events_endpoint if info is not None else None
        return subscribe_address(endpoint, w) if endpoint else None

    def _socket(self, address: str) -> zmq.asyncio.Socket:
        sock = self.zctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(address)
        return sock

    async def follow(self, w: Worker, address: str) -> None:
        sock = self._socket(address)
        idx = self.index.follow(w.url, w.info.hicache_storage if w.info is not None else None)
        logger.info("following KV events of %s at %s", w.url, address)
        try:
            await asyncio.sleep(JOIN_DELAY_S)
            await self.resync(w, idx)
            while True:
                try:
                    frames = await asyncio.wait_for(sock.recv_multipart(copy=True), SILENCE_S)
                except asyncio.TimeoutError:  # no heartbeat: the worker is down or moved its endpoint
                    idx.synced = False
                    now = await self.endpoint_now(w)
                    if now is None:
                        continue  # still down: not indexed until it answers again
                    if now != address:
                        logger.info("KV events of %s moved to %s", w.url, now)
                        sock.close(linger=0)
                        address, sock = now, self._socket(now)
                        await asyncio.sleep(JOIN_DELAY_S)
                    await self.resync(w, idx)
                    continue
                ok = False
                if len(frames) == 3:
                    try:
                        ok = idx.apply(seq_of(frames[1]), decode_batch(frames[2]))
                    except msgspec.DecodeError as exc:
                        logger.warning("undecodable KV event batch from %s: %s", w.url, exc)
                if not ok:
                    idx.synced = False
                    await self.resync(w, idx)
        finally:
            sock.close(linger=0)
