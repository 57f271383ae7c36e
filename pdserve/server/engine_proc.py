"""The engine process: one Engine driven by msgpack messages from the HTTP front over ZMQ.

Lifecycle:
  1. the front calls `spawn_engine_process` ('spawn' multiprocessing context); the child runs
     `engine_main`: it dies with its parent (PR_SET_PDEATHSIG + a parent-pid check), ignores
     SIGINT (the front decides when to stop), connects its sockets
     (PULL for `EngineInMsg`, PUSH for `EngineOutMsg`) and builds the Engine (slow);
  2. it runs one warm-up request (unless --skip-server-warmup), then sends `EngineReady` (or
     `EngineFailed` and exits 1); loading logs its progress (weights, KV pool, warm-up);
  3. `EngineLoop.run`: while there is work, drain the inbox without blocking, `step()`, and send
     the step's TokenOuts as one `TokenOutBatch` (a step that made no progress naps 1 ms on the
     inbox instead of spinning) and, every --log-stats-interval, the stats line (engine/stats.py);
     when idle, run `check_integrity()` once and block on the inbox. A bad request (add_request raises) is answered at once with a TokenOut
     whose `error` is set. Control requests are answered between steps;
     With `--kv-events-config` a KVPublisher (server/kv_publisher.py) publishes the prefix cache's
     events after every step and control message, a heartbeat after a quiet second (busy or
     idle), and answers `KVSnapshotReq`;
  4. `ShutdownReq` (or the parent's death) ends the loop; an exception in `step()` sends
     `EngineFailed` and exits 1.
Nothing is pickled on the sockets; the config crosses the spawn boundary as JSON bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import msgspec
import zmq

from pdserve.engine.config import EngineConfig
from pdserve.disagg import DisaggConfig
from pdserve.flags.procs import die_with_parent
from pdserve.engine.messages import (
    AbortReq,
    EngineFailed,
    EngineInMsg,
    EngineOutMsg,
    EngineReady,
    FlushCacheReq,
    FlushCacheResp,
    GenerateReq,
    GetLoadReq,
    KVSnapshotReq,
    KVSnapshotResp,
    LoadResp,
    ShutdownReq,
    TokenOut,
    TokenOutBatch,
)

from pdserve.kv_events import parse_kv_events_config

if TYPE_CHECKING:  # the front imports this module: it must not import torch
    from pdserve.engine.engine import Engine
    from pdserve.server.kv_publisher import KVPublisher

logger = logging.getLogger("pdserve.engine_proc")

IDLE_POLL_MS = 1000  # how often an idle engine checks that its parent is alive
NAP_MS = 1  # nap between steps that made no progress (KV in transit, nothing admissible)
DP_IDLE_POLL_MS = 1000  # DP attention, every rank idle: the beat of their rounds (the front wakes them all
# with each request: WakeReq)


def spawn_engine_process(config: EngineConfig, in_addr: str, out_addr: str,
                         disagg: DisaggConfig | None = None) -> BaseProcess:
    """Start the engine process (daemonic, 'spawn' context) and return it; it connects to
    `in_addr` (its inbox) and `out_addr` (its outbox), which the front has bound."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=engine_main,
        args=(msgspec.json.encode(config), in_addr, out_addr, os.getpid(),
              msgspec.json.encode(disagg or DisaggConfig())),
        name="pdserve-engine",
        daemon=True,
    )
    proc.start()
    return proc


def _model_summary(engine: Engine) -> dict[str, int | float | str | bool | None]:
    """The model config's scalar fields (for /model_info); lists and tuples become strings."""
    mc = engine.model_config
    out: dict[str, int | float | str | bool | None] = {}
    for f in dataclasses.fields(mc):
        value = getattr(mc, f.name)
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[f.name] = value if value is None or isinstance(value, (int, float, str, bool)) else str(value)
    return out


def ready_message(engine: Engine, config: EngineConfig, kv_events_endpoint: str | None = None) -> EngineReady:
    load = engine.load()
    return EngineReady(
        pid=os.getpid(),
        model_path=str(engine.model_path),
        vocab_size=engine.model_config.vocab_size,
        max_model_len=engine.max_model_len,
        page_size=load.page_size,
        num_pages=load.num_pages,
        max_running=config.max_running,
        device=str(engine.device),
        tokenizer_path=str(engine.tokenizer_path),
        model_config=_model_summary(engine),
        kv_events_endpoint=kv_events_endpoint,
    )


class EngineLoop:
    """Drives one Engine from the inbox socket and reports to the outbox socket."""

    def __init__(self, engine: Engine, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int,
                 kv_events: KVPublisher | None = None) -> None:
        self.engine = engine
        self.kv_events = kv_events
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.decoder = msgspec.msgpack.Decoder(EngineInMsg)
        self.encoder = msgspec.msgpack.Encoder()
        self.pending: list[TokenOut] = []  # immediate answers (add_request errors)
        self.integrity_errors = 0
        self.stopping = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        checked_idle = False
        while not self.stopping:
            if self.engine.has_work():
                t0 = time.perf_counter()
                self._drain()
                if self.stopping:
                    break
                before = self.engine.num_forward_tokens
                outs = self.engine.step()
                checked_idle = False
                self._send_outs(outs)
                if self.kv_events is not None:
                    self.kv_events.heartbeat()  # the step's cache events, or a heartbeat when due
                self.engine.stats.on_busy(time.perf_counter() - t0)
                self.engine.log_stats()
                stalled = not outs and self.engine.num_forward_tokens == before
                if (stalled or self.engine.is_waiting_on_transfers()) and poller.poll(NAP_MS):
                    self._drain()  # don't spin a core while nothing can move
                continue
            self._send_outs([])
            if not checked_idle:
                self._check_integrity()
                checked_idle = True
            self.engine.log_stats()  # the last busy window's line, then nothing while idle
            if poller.poll(IDLE_POLL_MS):
                self._drain()
            elif os.getppid() != self.parent_pid:
                logger.warning("parent process is gone; engine exits")
                return
            elif self.kv_events is not None:
                self.kv_events.heartbeat()

    def _step(self) -> list[TokenOut]:
        t0 = time.perf_counter()
        outs = self.engine.step()
        self._send_outs(outs)
        self.engine.stats.on_busy(time.perf_counter() - t0)
        self.engine.log_stats()
        return outs

    def _send(self, msg: EngineOutMsg) -> None:
        self.outbox.send(self.encoder.encode(msg), copy=False)

    def _send_outs(self, outs: list[TokenOut]) -> None:
        if self.pending:
            outs = self.pending + list(outs)
            self.pending = []
        if outs:
            self._send(TokenOutBatch(outs=list(outs)))

    def _check_integrity(self) -> None:
        try:
            self.engine.check_integrity()
        except AssertionError as exc:
            self.integrity_errors += 1
            logger.error("KV pool integrity check failed: %s", exc)

    def _drain(self) -> None:
        while not self.stopping:
            try:
                raw = self.inbox.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = self.decoder.decode(raw.buffer)
            except msgspec.DecodeError as exc:
                logger.error("dropping undecodable message: %s", exc)
                continue
            self._handle(msg)
            if self.kv_events is not None:
                self.kv_events.flush()

    def _handle(self, msg: EngineInMsg) -> None:
        if isinstance(msg, GenerateReq):
            try:
                self.engine.add_request(msg)
            except Exception as exc:  # bad input: answer now, keep serving
                self.pending.append(TokenOut(rid=msg.rid, token_ids=[], finish_reason="abort",
                                             prompt_tokens=len(msg.input_ids), error=str(exc) or repr(exc)))
        elif isinstance(msg, AbortReq):
            try:
                self.engine.abort(msg.rid)
            except Exception as exc:  # unknown or already finished
                logger.debug("abort %s: %s", msg.rid, exc)
        elif isinstance(msg, GetLoadReq):
            self._send(LoadResp(cid=msg.cid, load=self.engine.load(msg.step_trace),
                                integrity_errors=self.integrity_errors))
        elif isinstance(msg, FlushCacheReq):
            ok = bool(self.engine.flush_cache())
            self._send(FlushCacheResp(cid=msg.cid, ok=ok))
        elif isinstance(msg, KVSnapshotReq):
            snap = self.kv_events.snapshot() if self.kv_events is not None else None
            self._send(KVSnapshotResp(cid=msg.cid, snapshot=snap))
        elif isinstance(msg, ShutdownReq):
            self.stopping = True


class DPAttentionLoop(EngineLoop):
    """An engine that is one DP-attention rank: every iteration is one round with the other
    ranks (engine/dp_attention.py), whether this rank has work or not; all ranks nap on their
    inboxes only in a round where none was busy."""

    def run(self) -> None:
        dp = self.engine.dp
        assert dp is not None
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        checked_idle = False
        while not self.stopping:
            self._drain()
            if self.stopping:
                break
            if self.engine.has_work():
                outs = self._step()  # its round included
                checked_idle = False
            else:
                outs = []
                dp.finish_round(busy=False)
                self._send_outs([])
                if not checked_idle:
                    self._check_integrity()
                    checked_idle = True
                self.engine.log_stats()
            if self.kv_events is not None:
                self.kv_events.heartbeat()  # this round's cache events, or a heartbeat when due
            if dp.view.any_busy:
                if not outs and dp.view.max_tokens == 0:
                    poller.poll(NAP_MS)  # KV in transit somewhere: don't spin both cores on rounds
                continue
            if not poller.poll(DP_IDLE_POLL_MS) and os.getppid() != self.parent_pid:
                logger.warning("parent process is gone; engine exits")
                return


def engine_main(config_json: bytes, in_addr: str, out_addr: str, parent_pid: int, disagg_json: bytes = b"{}") -> None:
    """Entry point of the engine process (see the module docstring)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s engine: %(message)s")
    config = msgspec.json.decode(config_json, type=EngineConfig)
    disagg = msgspec.json.decode(disagg_json, type=DisaggConfig)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    outbox = ctx.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
    inbox.connect(in_addr)
    outbox.connect(out_addr)
    code = 0
    kv_events: KVPublisher | None = None
    try:
        from pdserve.engine.engine import Engine
        from pdserve.engine.kv_event_log import KVEventLog
        from pdserve.server.kv_publisher import KVPublisher

        engine = Engine(config, disagg)
        events_cfg = parse_kv_events_config(config.kv_events_config)
        if events_cfg is not None:
            kv_events = KVPublisher.open(events_cfg, ctx, KVEventLog(engine.kv.cache))
            logger.info("KV events published on %s", kv_events.endpoint)
        if config.warmup:
            logger.info("warm-up request done in %.2f s", engine.warm_up())
        outbox.send(msgspec.msgpack.encode(ready_message(engine, config, kv_events.endpoint if kv_events else None)))
    except BaseException:
        outbox.send(msgspec.msgpack.encode(EngineFailed(message="engine start-up failed:\n" + traceback.format_exc())))
        code = 1
    else:
        try:
            loop = DPAttentionLoop if engine.dp is not None else EngineLoop
            loop(engine, inbox, outbox, parent_pid, kv_events).run()
        except BaseException:
            logger.exception("engine loop failed")
            outbox.send(msgspec.msgpack.encode(EngineFailed(message="engine failed:\n" + traceback.format_exc())))
            code = 1
        finally:
            engine.close()  # PD: close transfer sessions and the bootstrap server cleanly
    if kv_events is not None:
        kv_events.close()
    inbox.close(linger=0)
    outbox.close(linger=1000)
    ctx.term()
    if code:
        sys.exit(code)
