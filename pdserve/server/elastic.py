"""Drain and live role switch of one server (issue 26): its admission, its discovery record, its PD stage.

    serving ──POST /drain──▶ draining ──(nothing in flight, the pool's pages back)──▶ drained
       ▲                                                                                 │
       └── POST /switch_role: drain, swap the engine's stage, epoch + 1, register again ─┘

Lifecycle of `Elastic` (one per app, `app.state.elastic`, built with the app):
  - `register(state)`: once uvicorn serves (http_server.py), with --discovery: the server's record
    goes into etcd under a lease (server/registration.py); `stop_registration()` at exit;
  - `drain(state)`: admission stops at once (`admit` answers new generation requests 503
    `draining`, /health answers 503 so routers' own checks take it out too), the record leaves
    etcd (routers that follow it drop the worker within milliseconds), then it waits (bounded)
    until nothing is in flight for `QUIET_S` — both PD legs: a prefill's request ends once its KV
    reached the decode, a decode's once it finished — and the engine's pages are back (no page in
    use: free + cached = the pool). It stays drained (the planner's local connector stops it then);
  - `switch(state, role)`: drain, then the engine swaps its PD stage (SwitchStageReq: the same
    weights, pool and compiled state; the prefix cache is flushed), the config's disagg gets the
    new mode and epoch + 1 (`/server_info` says both), a new record goes into etcd and admission
    opens again; it answers once the record is in (bounded by the etcd timeout). If the drain
    does not end in time (504) or the engine refuses or fails the swap (500), the old role serves
    again, registered again;
  - `admit(state, body)`: every generation request's check (handler.py): 503 while not serving, 409
    `stale_epoch` when the body names an epoch (contract.EPOCH, set by a router per leg) that is not
    this server's: the router's view of this server is older than its role, so it must not pair it.
One switch or drain at a time (a lock); a second waits for the first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.contract import DRAINING, EPOCH, STALE_EPOCH
from pdserve.discovery import Registration
from pdserve.server.config import ServerConfig
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import APIError
from pdserve.server.registration import deregister_soon, register
from pdserve.server.state import ServerState

logger = logging.getLogger("pdserve.server")

SERVING, DRAINING_PHASE, DRAINED, SWITCHING = "serving", "draining", "drained", "switching"
PD_ROLES = ("prefill", "decode")
POLL_S = 0.02
QUIET_S = 0.1  # nothing in flight this long: no admitted request is still on its way to the engine


@dataclass
class Elastic:
    config: ServerConfig  # as started: the decode's radix-cache flag comes back with a switch to decode
    phase: str = SERVING
    registration: Registration | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the last drain or switch, as answered
    _lock: asyncio.Lock | None = None

    @property
    def serving(self) -> bool:
        return self.phase == SERVING

    def admit(self, state: ServerState, body: object) -> None:
        if self.phase != SERVING:
            raise APIError(503, f"the server is {self.phase}: it takes no new requests", code=DRAINING)
        epoch = getattr(body, EPOCH, None)
        if epoch is not None and epoch != state.config.disagg.epoch:
            raise APIError(409, f"stale epoch {epoch}: this server is at epoch {state.config.disagg.epoch} as "
                                f"{state.config.disagg.mode}", param=EPOCH, code=STALE_EPOCH)

    # ---------------------------------------------------------------- discovery record
    def register(self, state: ServerState) -> None:
        if state.config.discovery is not None:
            self.registration = register(state.config, state)

    async def _deregister(self) -> None:
        reg, self.registration = self.registration, None
        if reg is not None:
            await asyncio.to_thread(reg.stop)

    def deregister_soon(self) -> None:
        """From a signal handler: revoke the lease without blocking (http_server.py)."""
        if self.registration is not None:
            deregister_soon(self.registration)

    def stop_registration(self) -> None:
        reg, self.registration = self.registration, None
        if reg is not None:
            reg.stop()  # bounded

    # ---------------------------------------------------------------- drain and switch
    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def drain(self, state: ServerState, timeout_s: float) -> dict[str, Any]:
        async with self._locked():
            report = await self._drain(state, timeout_s)
            self.last = report
            return report

    async def _drain(self, state: ServerState, timeout_s: float) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        if self.phase == SERVING:
            logger.info("draining: no new requests; %d in flight", state.client.num_in_flight)
        self.phase = DRAINING_PHASE
        await self._deregister()
        t_dereg = time.monotonic() - t0
        quiet_since: float | None = None
        while True:
            now = time.monotonic()
            if state.client.num_in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= QUIET_S and (used := await self._used_pages(state)) == 0:
                break
            if now > deadline:
                raise APIError(504, f"not drained after {timeout_s:g} s: {state.client.num_in_flight} requests in "
                                    "flight; the server stays draining (POST /drain again to wait)", code=DRAINING)
            await asyncio.sleep(POLL_S)
        self.phase = DRAINED
        seconds = time.monotonic() - t0
        logger.info("drained in %.2f s (deregistered in %.2f s)", seconds, t_dereg)
        return {"status": DRAINED, "seconds": round(seconds, 4), "deregister_s": round(t_dereg, 4),
                "in_flight": 0, "used_pages": used, "role": state.config.disagg.mode,
                "epoch": state.config.disagg.epoch}

    @staticmethod
    async def _used_pages(state: ServerState) -> int:
        resp = await state.client.get_load(state.config.control_timeout_s)
        load = resp.load
        if load.num_running or load.num_waiting:
            return -1
        return load.num_pages - load.free_pages - load.cached_pages

    def check_switch(self, state: ServerState, role: str) -> None:
        cfg = state.config
        if role not in PD_ROLES:
            raise APIError(400, f"role must be one of {', '.join(PD_ROLES)}, got {role!r}", param="role")
        if cfg.disagg.mode not in PD_ROLES:
            raise APIError(400, "a unified server (--disaggregation-mode null) does not switch roles", param="role")
        layout = cfg.engine.parallel
        if layout.tp_size > 1 or layout.dp_size > 1 or not isinstance(state.client, EngineClient):
            raise APIError(400, "a live role switch needs --tp-size 1 and --dp-size 1", param="role")
        if cfg.disagg.backend == "shm":
            raise APIError(400, "a live role switch is not supported with the shm transfer backend (its decode "
                                "pool lives in shared memory from the start)", param="role")

    async def switch(self, state: ServerState, role: str, timeout_s: float,
                     bootstrap_port: int | None = None) -> dict[str, Any]:
        self.check_switch(state, role)
        async with self._locked():
            old = state.config.disagg
            if role == old.mode and self.phase == SERVING:
                return {"role": role, "epoch": old.epoch, "switched": False, "seconds": 0.0}
            t0 = time.monotonic()
            try:
                drained = await self._drain(state, timeout_s)
            except APIError as exc:  # not drained in time: it serves on in its old role, registered again
                await self._serve(state)
                raise APIError(exc.status, f"switch to {role} abandoned: {exc.message}", code=DRAINING) from None
            new = dataclasses.replace(old, mode=role, epoch=old.epoch + 1,
                                      bootstrap_port=bootstrap_port or old.bootstrap_port,
                                      decode_enable_radix_cache=role == "decode" and
                                      self.config.disagg.decode_enable_radix_cache)
            self.phase = SWITCHING
            t1 = time.monotonic()
            assert isinstance(state.client, EngineClient)
            resp = await state.client.switch_stage(new, max(1.0, timeout_s))
            t_swap = time.monotonic() - t1
            if resp.error is not None:
                await self._serve(state)
                raise APIError(500, f"the engine did not switch to {role}: {resp.error}; it serves as {old.mode}",
                               code="switch_failed")
            state.config = dataclasses.replace(state.config, disagg=new)
            t2 = time.monotonic()
            registered = await self._serve(state)
            report = {"role": role, "epoch": new.epoch, "switched": True, "seconds": round(time.monotonic() - t0, 4),
                      "drain_s": drained["seconds"], "deregister_s": drained["deregister_s"],
                      "swap_s": round(t_swap, 4), "engine_swap_s": round(resp.seconds, 4),
                      "register_s": round(time.monotonic() - t2, 4), "registered": registered,
                      "bootstrap_port": new.bootstrap_port if role == "prefill" else None}
            self.last = report
            logger.info("now %s at epoch %d: switch took %.2f s (drain %.2f, swap %.2f)", role, new.epoch,
                        report["seconds"], drained["seconds"], t_swap)
            return report

    async def _serve(self, state: ServerState) -> bool:
        """Register (again) and open admission; True once the record is in etcd (or without discovery)."""
        self.register(state)
        reg = self.registration
        ok = True
        if reg is not None and state.config.discovery is not None:
            ok = await asyncio.to_thread(reg.registered.wait, 2 * state.config.discovery.timeout_s + 1)
        self.phase = SERVING
        return ok
