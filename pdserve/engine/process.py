"""The engine process: one Engine driven by msgpack messages from the HTTP front over ZMQ.

Lifecycle:
  1. the front calls `spawn_engine_process` ('spawn' multiprocessing context); the child runs
     `engine_main`: it dies with its parent (PR_SET_PDEATHSIG + a parent-pid check), ignores
     SIGINT (the front decides when to stop), connects its sockets
     (PULL for `EngineInMsg`, PUSH for `EngineOutMsg`) and builds the Engine (slow);
  2. it runs one warm-up request (unless --skip-server-warmup), then sends `EngineReady` (or
     `EngineFailed` and exits 1); loading logs its progress (weights, KV pool, warm-up);
  3. `EngineLoop.run`: each iteration drains the inbox without blocking; with work it runs
     `step()` and sends the step's TokenOuts as one `TokenOutBatch` and, every
     --log-stats-interval, the stats line (engine/stats.py); idle, it runs `check_integrity()`
     once. Then the round decides how it waits: a plain engine (SoloRound) naps 1 ms on the
     inbox after a step that made no progress (instead of spinning) and sleeps on it when idle;
     a DP-attention rank (DPAttentionRound) joins one round with the other ranks every
     iteration and sleeps only when no rank is busy. A bad request (add_request raises) is
     answered at once with a TokenOut whose `error` is set; control requests are answered
     between steps (`SwitchStageReq`: a live role switch of the idle engine, Engine.switch_stage).
     With `--kv-events-config` a KVPublisher (engine/kv_publisher.py) publishes
     the prefix cache's events after every step and control message, a heartbeat after a
     quiet second (busy or idle), and answers `KVSnapshotReq`;
  4. `ShutdownReq` (or the parent's death) ends the loop; an exception in `step()` sends
     `EngineFailed` and exits 1.
Nothing is pickled on the sockets; the config crosses the spawn boundary as JSON bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Protocol

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
    SwitchStageReq,
    SwitchStageResp,
    TokenOut,
    TokenOutBatch,
)

from pdserve.kv_events import parse_kv_events_config

if TYPE_CHECKING:  # the front imports this module: it must not import torch
    from pdserve.engine.dp_attention import DPAttentionRank
    from pdserve.engine.engine import Engine
    from pdserve.engine.kv_publisher import KVPublisher

logger = logging.getLogger("pdserve.engine.process")

IDLE_POLL_MS = 1000  # how often an idle engine checks that its parent is alive; under DP attention,
# every rank idle, the beat of their rounds (the front wakes them all with each request: WakeReq)
NAP_MS = 1  # nap between steps that made no progress (KV in transit, nothing admissible)


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


Scalar = int | float | str | bool | None


def _scalar(value: object) -> Scalar:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def _model_summary(engine: Engine) -> dict[str, Scalar]:
    """The model config's scalar fields (for /model_info, /server_info); lists and tuples become
    strings, the MoE / MLA records' fields are named "moe.<field>" / "mla.<field>"."""
    mc = engine.model_config
    out: dict[str, Scalar] = {"attention_kind": mc.attention_kind,
                              "kv_bytes_per_token": mc.kv_elements_per_token * engine.pool.tensors[0].element_size()}
    for f in dataclasses.fields(mc):
        value = getattr(mc, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": _scalar(v) for k, v in dataclasses.asdict(value).items()})  # type: ignore
        else:
            out[f.name] = _scalar(value)
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


class Wait(enum.Enum):
    """What the loop does after an iteration: go on, nap briefly on the inbox, or sleep on it."""

    GO = 0
    NAP = 1  # NAP_MS: nothing could move (KV in transit, nothing admissible); wake on a message
    SLEEP = 2  # IDLE_POLL_MS: idle; wake on a message, else check that the parent is alive


class Round(Protocol):
    """What one loop iteration does beyond the engine's step, and how the loop waits after it."""

    def idle(self) -> None:
        """The iteration had no work (the engine did not step)."""
        ...

    def wait(self, busy: bool, stalled: bool) -> Wait:
        """After the iteration: `busy` if the engine stepped, `stalled` if it had no outputs and
        forwarded no token."""
        ...


class SoloRound:
    """A plain engine: nothing to do with anyone; sleeps when idle, naps while nothing can move."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def idle(self) -> None:
        pass

    def wait(self, busy: bool, stalled: bool) -> Wait:
        if not busy:
            return Wait.SLEEP
        return Wait.NAP if stalled or self.engine.is_waiting_on_transfers() else Wait.GO


class DPAttentionRound:
    """A DP-attention rank (engine/dp_attention.py): every iteration is one round with the other
    ranks, whether this rank has work or not (a busy step ends its round inside `Engine.step`);
    all ranks sleep on their inboxes only after a round in which none was busy."""

    def __init__(self, dp: DPAttentionRank) -> None:
        self.dp = dp

    def idle(self) -> None:
        self.dp.finish_round(busy=False)  # the same round: an idle forward if another rank forwards

    def wait(self, busy: bool, stalled: bool) -> Wait:
        view = self.dp.view
        if not view.any_busy:
            return Wait.SLEEP
        # no rank forwarded a token and this one made no output: KV in transit somewhere, so don't
        # spin both cores on rounds
        return Wait.NAP if stalled and view.max_tokens == 0 else Wait.GO


class EngineLoop:
    """Drives one Engine from the inbox socket and reports to the outbox socket; `rounds` is what
    each iteration does with other engines (SoloRound: nothing; DPAttentionRound: the DP round).

    one iteration:  drain the inbox (control messages answered, requests added)
                    work:  step, send its TokenOutBatch, KV events, busy time, stats line
                    idle:  rounds.idle(), send pending answers, integrity check once, stats line
                    KV-event heartbeat when due
                    rounds.wait(): GO | NAP (NAP_MS on the inbox) | SLEEP (IDLE_POLL_MS on the
                    inbox; a quiet sleep with the parent gone ends the loop)
    """

    def __init__(self, engine: Engine, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int,
                 kv_events: KVPublisher | None = None, rounds: Round | None = None) -> None:
        self.engine = engine
        self.kv_events = kv_events
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.rounds = rounds or SoloRound(engine)
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
            t0 = time.perf_counter()
            self._drain()
            if self.stopping:
                break
            busy = self.engine.has_work()
            if busy:
                stalled = self._step(t0)
                checked_idle = False
            else:
                stalled = True  # no step ran
                self.rounds.idle()
                self._send_outs([])
                if not checked_idle:
                    self._check_integrity()
                    checked_idle = True
                self.engine.log_stats()  # the last busy window's line, then nothing while idle
                self._heartbeat()
            wait = self.rounds.wait(busy, stalled)
            if wait is Wait.NAP:
                poller.poll(NAP_MS)  # don't spin a core while nothing can move
            elif wait is Wait.SLEEP and not poller.poll(IDLE_POLL_MS) and os.getppid() != self.parent_pid:
                logger.warning("parent process is gone; engine exits")
                return

    def _step(self, t0: float) -> bool:
        """One engine step and its reports; True if it made no output and forwarded no token."""
        before = self.engine.num_forward_tokens
        outs = self.engine.step()
        self._send_outs(outs)
        self._heartbeat()  # the step's cache events, or a heartbeat when due
        self.engine.stats.on_busy(time.perf_counter() - t0)
        self.engine.log_stats()
        return not outs and self.engine.num_forward_tokens == before

    def _heartbeat(self) -> None:
        if self.kv_events is not None:
            self.kv_events.heartbeat()

    def _send(self, msg: EngineOutMsg) -> None:
        self.outbox.send(self.encoder.encode(msg), copy=False)

    def _send_outs(self, outs: list[TokenOut]) -> None:
        if self.pending:
            outs = self.pending + list(outs)
            self.pending = []
        if outs:
            self._send(TokenOutBatch(outs=list(outs), load=self.engine.brief()))

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
        elif isinstance(msg, SwitchStageReq):
            t0 = time.perf_counter()
            try:
                self.engine.switch_stage(msg.disagg)
                error = None
                logger.info("serving as %s (epoch %d) after a live role switch in %.2f s", msg.disagg.mode,
                            msg.disagg.epoch, time.perf_counter() - t0)
            except Exception as exc:  # refused (not idle, tp/dp, backend) or the new stage failed: old mode kept
                error = f"{type(exc).__name__}: {exc}"
                logger.error("live role switch to %s refused: %s", msg.disagg.mode, error)
            self._send(SwitchStageResp(cid=msg.cid, error=error, seconds=time.perf_counter() - t0))
        elif isinstance(msg, ShutdownReq):
            self.stopping = True


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
        from pdserve.engine.kv_publisher import KVPublisher

        engine = Engine.build(config, disagg)
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
            rounds = DPAttentionRound(engine.dp) if engine.dp is not None else SoloRound(engine)
            EngineLoop(engine, inbox, outbox, parent_pid, kv_events, rounds).run()
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
