"""ZMQ PUB side of KV events, in the engine process (format: pdserve/kv_events/events.py).

Lifecycle: `KVPublisher.open(cfg, ctx, log)` binds the PUB socket (127.0.0.1 and a free port
unless `--kv-events-config` names an endpoint) and attaches the event log to the prefix cache;
`endpoint` is the bound address (advertised by /server_info); `flush()` after each engine step
or control message sends what the cache reported as one batch (seq + 1); `heartbeat()` (after
steps and while idle) re-sends the current seq with no events when nothing went out for
HEARTBEAT_S, so subscribers detect a lost tail and take silence for trouble;
`snapshot()` flushes, then lists the cache at the current seq; `close()` at shutdown.
"""

from __future__ import annotations

import time

import zmq

from pdserve.engine.kv_event_log import KVEventLog
from pdserve.kv_events import KVEventBatch, KVEventsConfig, KVSnapshot, encode_batch, seq_frame

HEARTBEAT_S = 1.0


class KVPublisher:
    def __init__(self, sock: zmq.Socket, log: KVEventLog, topic: str) -> None:
        self.sock = sock
        self.log = log
        self.topic = topic.encode()
        self.seq = 0
        self.last_sent = 0.0
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @classmethod
    def open(cls, cfg: KVEventsConfig, ctx: zmq.Context, log: KVEventLog) -> "KVPublisher":
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.bind(cfg.endpoint)
        log.attach()
        return cls(sock, log, cfg.topic)

    def _send(self, batch: KVEventBatch) -> None:
        self.last_sent = time.monotonic()
        try:
            self.sock.send_multipart([self.topic, seq_frame(self.seq), encode_batch(batch)], flags=zmq.NOBLOCK)
        except zmq.Again:  # a full queue drops the batch; subscribers see the gap and resync
            pass

    def flush(self) -> None:
        events = self.log.take()
        if events:
            self.seq += 1
            self._send(KVEventBatch(ts=time.time(), events=events))

    def heartbeat(self) -> None:
        self.flush()
        if time.monotonic() - self.last_sent >= HEARTBEAT_S:
            self._send(KVEventBatch(ts=time.time(), events=[]))

    def snapshot(self) -> KVSnapshot:
        self.flush()
        return self.log.snapshot(self.seq)

    def close(self) -> None:
        self.sock.close(linger=0)
