"""The server's admission and switch checks (server/elastic.py) without an engine: 503 while not serving,
409 for a stale role epoch, and the servers that cannot switch roles live (400 naming why)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from pdserve.contract import DRAINING, EPOCH, STALE_EPOCH
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig
from pdserve.server.config import ServerConfig
from pdserve.server.elastic import DRAINED, Elastic
from pdserve.server.engine_client import EngineClient
from pdserve.server.errors import APIError


def _state(mode: str = "decode", epoch: int = 1, backend: str = "tcp", tp: int = 1) -> SimpleNamespace:
    cfg = ServerConfig(engine=EngineConfig(tp_size=tp), disagg=DisaggConfig(mode=mode, epoch=epoch, backend=backend))
    return SimpleNamespace(config=cfg, client=EngineClient(cfg.engine, disagg=cfg.disagg))


def _refusal(fn: object, *args: object) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


def test_admission_refuses_while_draining_and_a_stale_epoch() -> None:
    state = _state(epoch=3)
    el = Elastic(state.config)
    el.admit(state, SimpleNamespace(**{EPOCH: None}))  # a body naming no epoch (a client, a foreign router)
    el.admit(state, SimpleNamespace(**{EPOCH: 3}))
    stale = _refusal(el.admit, state, SimpleNamespace(**{EPOCH: 2}))
    assert (stale.status, stale.code, stale.param) == (409, STALE_EPOCH, EPOCH) and "epoch 3 as decode" in stale.message
    el.phase = DRAINED
    drained = _refusal(el.admit, state, SimpleNamespace(**{EPOCH: 3}))
    assert (drained.status, drained.code) == (503, DRAINING) and not el.serving


def test_servers_that_cannot_switch_say_why() -> None:
    el = Elastic(ServerConfig())
    el.check_switch(_state(), "prefill")
    for state, role, words in ((_state(), "unified", "role must be one of prefill, decode"),
                               (_state(mode="null"), "prefill", "unified server"),
                               (_state(tp=2), "prefill", "--tp-size 1 and --dp-size 1"),
                               (_state(backend="shm"), "prefill", "shm")):
        refused = _refusal(el.check_switch, state, role)
        assert refused.status == 400 and words in refused.message, (role, refused.message)
    dp = _state()
    dp.client = object()  # a DP front (several engines) switches no stage
    assert "--dp-size 1" in _refusal(el.check_switch, dp, "prefill").message
    assert dataclasses.replace(DisaggConfig(mode="decode"), epoch=2).epoch == 2
    with pytest.raises(ValueError, match="epoch"):
        DisaggConfig(epoch=0)
