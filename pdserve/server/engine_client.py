"""The front's side of the engine process: sockets, dispatch of outputs, control calls.

Lifecycle (one per server, owned by the app's lifespan):
  1. `start()`: make a private temp dir for the ipc:// sockets, bind PUSH (engine inbox) and
     PULL (engine outbox), spawn the engine process, wait (bounded) for `EngineReady`, then run
     a receive task (dispatches TokenOuts to per-request queues, answers control futures) and a
     watchdog task (notices a dead engine process);
  2. `generate(req)`: an async iterator of the request's TokenOuts until the finished one; if
     the consumer stops early (client disconnect, stop string, cancellation) it sends AbortReq;
  3. `abort_all()` on shutdown signals ends every stream at once with finish_reason "abort";
  4. `close()`: ShutdownReq, join the process (bounded), terminate/kill it if needed, close the
     sockets and remove the temp dir.
If the engine dies, every in-flight stream raises `EngineDeadError`, new calls fail fast and
`on_dead` tells the server to exit (a supervisor restarts it; a front without engine is useless).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine.config import EngineConfig
from pdserve.engine.messages import (
    AbortReq,
    EngineFailed,
    EngineOutMsg,
    EngineReady,
    FlushCacheReq,
    FlushCacheResp,
    KVSnapshotReq,
    KVSnapshotResp,
    GenerateReq,
    LoadBrief,
    GetLoadReq,
    LoadResp,
    ShutdownReq,
    SwitchStageReq,
    SwitchStageResp,
    TokenOut,
    TokenOutBatch,
    WakeReq,
)
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.process import spawn_engine_process

logger = logging.getLogger("pdserve.engine_client")


class EngineDeadError(RuntimeError):
    """The engine process is gone (crashed, failed to start, or the server is stopping)."""


class DuplicateRequestError(ValueError):
    """A request id is already in flight."""


class EngineClient:
    def __init__(self, config: EngineConfig, start_timeout_s: float = 900.0,
                 on_dead: Callable[[str], None] | None = None, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        self.disagg = disagg or DisaggConfig()
        self.start_timeout_s = start_timeout_s
        self.on_dead = on_dead  # called once if the engine dies while serving
        self.info: EngineReady | None = None
        self.proc: BaseProcess | None = None
        self.dead_reason: str | None = None
        self.closing = False
        self.brief: LoadBrief | None = None  # the engine's load after its last step with outputs
        self._queues: dict[str, asyncio.Queue[TokenOut | BaseException]] = {}
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._cids = itertools.count(1)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineOutMsg)
        self._tasks: list[asyncio.Task[None]] = []
        self._tmpdir: str | None = None
        self._actx: zmq.asyncio.Context | None = None
        self._sctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> EngineReady:
        self._tmpdir = tempfile.mkdtemp(prefix="pdserve-")
        in_addr = f"ipc://{self._tmpdir}/engine-in"
        out_addr = f"ipc://{self._tmpdir}/engine-out"
        self._actx = zmq.asyncio.Context()
        self._sctx = zmq.Context.shadow(self._actx.underlying)
        self._push = self._sctx.socket(zmq.PUSH)
        self._pull = self._actx.socket(zmq.PULL)
        for sock in (self._push, self._pull):
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._push.bind(in_addr)
        self._pull.bind(out_addr)
        self.proc = spawn_engine_process(self.config, in_addr, out_addr, self.disagg)
        self.info = await self._wait_ready()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._recv_loop(), name="engine-recv"),
                       loop.create_task(self._watchdog(), name="engine-watchdog")]
        return self.info

    async def _wait_ready(self) -> EngineReady:
        assert self._pull is not None and self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if await self._pull.poll(timeout=500):
                msg = self._decoder.decode(await self._pull.recv())
                if isinstance(msg, EngineReady):
                    return msg
                if isinstance(msg, EngineFailed):
                    await self._reap(timeout=5.0)
                    raise EngineDeadError(msg.message)
                continue
            if not self.proc.is_alive():
                raise EngineDeadError(f"engine process exited during start-up (exit code {self.proc.exitcode})")
        await self._reap(timeout=1.0)
        raise EngineDeadError(f"engine not ready after {self.start_timeout_s:.0f} s")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process and release everything; safe to call more than once."""
        self.closing = True
        self.abort_all("server shutting down")
        if self.proc is not None and self.proc.is_alive() and self._push is not None:
            try:
                self._send(ShutdownReq())
            except EngineDeadError:
                pass  # _reap terminates it
        await self._reap(timeout=timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        self._push = self._pull = None
        if self._actx is not None:
            self._actx.term()
            self._actx = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def _reap(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, proc.join, timeout)
        if proc.is_alive():
            logger.warning("engine process did not stop in %.1f s; terminating it", timeout)
            proc.terminate()
            await loop.run_in_executor(None, proc.join, 3.0)
        if proc.is_alive():
            proc.kill()
            await loop.run_in_executor(None, proc.join, 3.0)

    # ---------------------------------------------------------------- requests
    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.proc is not None and self.proc.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def in_flight(self) -> list[str]:
        return list(self._queues)

    def has(self, rid: str) -> bool:
        return rid in self._queues

    def _check_usable(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self.closing or self._push is None:
            raise EngineDeadError("server is shutting down")

    def _send(self, msg: Any) -> None:
        assert self._push is not None
        try:
            self._push.send(self._encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            raise EngineDeadError(f"cannot reach the engine process: {exc}") from exc

    async def generate(self, req: GenerateReq) -> AsyncIterator[TokenOut]:
        """TokenOuts of `req` until (and including) the finished one; see the module docstring."""
        self._check_usable()
        if req.rid in self._queues:
            raise DuplicateRequestError(f"request id {req.rid!r} is already in flight")
        queue: asyncio.Queue[TokenOut | BaseException] = asyncio.Queue()
        self._queues[req.rid] = queue
        finished = False
        try:
            self._send(req)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(req.rid, None)
            if not finished and self._push is not None and self.dead_reason is None:
                try:
                    self._send(AbortReq(rid=req.rid))
                except EngineDeadError:
                    pass

    def wake(self) -> None:
        """DP attention: make an idle engine come round for another rank's request."""
        if self.dead_reason is None and self._push is not None:
            self._send(WakeReq())

    def abort(self, rid: str) -> list[str]:
        """Abort `rid` and its sub-requests (`rid-0`, `rid-1`, ...); returns the ids aborted."""
        prefix = rid + "-"
        hits = [r for r in self._queues if r == rid or r.startswith(prefix)]
        for r in hits:
            self._send(AbortReq(rid=r))
        return hits

    def abort_all(self, reason: str = "aborted") -> None:
        """End every in-flight stream now (finish_reason "abort") and tell the engine."""
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(TokenOut(rid=rid, token_ids=[], finish_reason="abort", matched_stop=reason))
            if self._push is not None and self.dead_reason is None:
                try:
                    self._send(AbortReq(rid=rid))
                except EngineDeadError:
                    pass

    # ---------------------------------------------------------------- control
    async def _call(self, make: Any, timeout: float) -> Any:
        self._check_usable()
        cid = next(self._cids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[cid] = fut
        try:
            self._send(make(cid))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._futures.pop(cid, None)

    async def get_load(self, timeout: float = 30.0, step_trace: bool = False) -> LoadResp:
        return await self._call(lambda cid: GetLoadReq(cid=cid, step_trace=step_trace), timeout)

    async def flush_cache(self, timeout: float = 30.0) -> bool:
        resp: FlushCacheResp = await self._call(lambda cid: FlushCacheReq(cid=cid), timeout)
        return resp.ok

    async def kv_snapshot(self, timeout: float = 30.0) -> KVSnapshotResp:
        return await self._call(lambda cid: KVSnapshotReq(cid=cid), timeout)

    async def switch_stage(self, disagg: DisaggConfig, timeout: float = 60.0) -> SwitchStageResp:
        """A live role switch of the idle engine (server/elastic.py); on success it runs `disagg`."""
        resp: SwitchStageResp = await self._call(lambda cid: SwitchStageReq(cid=cid, disagg=disagg), timeout)
        if resp.error is None:
            self.disagg = disagg
        return resp

    # ---------------------------------------------------------------- background tasks
    async def _recv_loop(self) -> None:
        assert self._pull is not None
        while True:
            raw = await self._pull.recv(copy=False)
            try:
                msg = self._decoder.decode(raw.buffer)
            except msgspec.DecodeError as exc:
                logger.error("undecodable message from the engine: %s", exc)
                continue
            if isinstance(msg, TokenOutBatch):
                if msg.load is not None:
                    self.brief = msg.load
                for out in msg.outs:
                    queue = self._queues.get(out.rid)
                    if queue is not None:
                        queue.put_nowait(out)
            elif isinstance(msg, (LoadResp, FlushCacheResp, KVSnapshotResp, SwitchStageResp)):
                fut = self._futures.get(msg.cid)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, EngineFailed):
                logger.error("%s", msg.message)
                self._mark_dead(msg.message.strip().splitlines()[-1] if msg.message.strip() else "engine failed")

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.proc is not None and not self.proc.is_alive() and not self.closing:
                self._mark_dead(f"engine process exited unexpectedly (exit code {self.proc.exitcode})")
                return

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("engine is dead: %s", reason)
            if self.on_dead is not None and not self.closing:
                self.on_dead(reason)
        err = EngineDeadError(self.dead_reason)
        for queue in self._queues.values():
            queue.put_nowait(err)
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(err)
