"""Disaggregation knobs: one frozen dataclass, read from the environment once.

Lifecycle: a server builds `DisaggConfig.from_env(mode=..., backend=..., ...)` once at start-up
(CLI flags as keyword overrides, environment knobs for the rest) and hands the same frozen object
to the bootstrap server/client and to the transfer manager. Nothing re-reads the environment later.

Environment (`PDSERVE_DISAGGREGATION_<NAME>`; the seed's `SGLANG_DISAGGREGATION_<NAME>` is accepted
as an alias, and the PDSERVE name wins when both are set):

| NAME                  | default                                 | meaning; what raising it costs              |
|-----------------------|-----------------------------------------|---------------------------------------------|
| THREAD_POOL_SIZE      | min(max(4, int(0.75*cpu_count)//8), 12) | transfer threads per rank: each of the      |
|                       |                                         | queue_size queues gets THREAD_POOL_SIZE //  |
|                       |                                         | QUEUE_SIZE helpers for copies (shm); more = |
|                       |                                         | more threads competing with the model       |
| QUEUE_SIZE            | 4                                       | parallel transfer queues; a decode always   |
|                       |                                         | maps to the same one (FCFS); 1 = one by one;|
|                       |                                         | more = one consumer thread each             |
| BOOTSTRAP_TIMEOUT     | 300 s                                   | prefill waits for decode's page list; longer|
|                       |                                         | = slower cleanup when a decode never comes  |
| WAITING_TIMEOUT       | 300 s                                   | decode waits for its KV after init (prefill |
|                       |                                         | waits as long for decode's ack); longer =   |
|                       |                                         | reserved pages held longer by a hung peer   |
| HEARTBEAT_INTERVAL    | 5 s                                     | decode polls each prefill's /health; a dead |
| HEARTBEAT_MAX_FAILURE | 2                                       | prefill is noticed within interval x misses;|
|                       |                                         | larger = slower detection, fewer false ones |
| NIXL_BACKEND          | UCX                                     | the NIXL backend plugin (nixl backend only) |
| MOONCAKE_PROTOCOL     | tcp                                     | mooncake transport: tcp, or rdma (needs     |
|                       |                                         | --disaggregation-ib-device)                 |
| MOONCAKE_METADATA     | P2PHANDSHAKE                            | mooncake metadata server: P2PHANDSHAKE (none|
|                       |                                         | needed) or an etcd/http URL                 |
| IB_DEVICE             | (none)                                  | RDMA device(s) for mooncake/nixl, e.g. mlx5_0|
| FAILURE_POLICY        | recompute                               | decode, when a transfer fails: recompute the|
|                       |                                         | prompt locally, or `error` (a clean 503)    |
| FAIL_RATE (test only) | 0.0                                     | probability that one queued send fails      |

plus `PDSERVE_CLUSTER_TOKEN` (cluster_token: required on bootstrap writes and transfer sessions),
and one field set only by its flag: decode_enable_radix_cache (`--disaggregation-decode-enable-radix-cache`,
decode mode only, default off: the decode matches prompts against its own prefix cache and only
the pages past its hit move; engine/pd/decode.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.contract import DEFAULT_BOOTSTRAP_PORT
from pdserve.disagg.backends import BACKENDS

MODES = ("null", "prefill", "decode")
FAILURE_POLICIES = ("recompute", "error")
ENV_PREFIX = "PDSERVE_DISAGGREGATION_"
ALIAS_PREFIX = "SGLANG_DISAGGREGATION_"
TOKEN_ENV = "PDSERVE_CLUSTER_TOKEN"
DECODE_RADIX_FLAG = "--disaggregation-decode-enable-radix-cache"


def check_decode_radix_cache(enabled: bool, mode: str, prefix_cache: bool = True) -> None:
    """The one rule of DECODE_RADIX_FLAG, which serve, launch, the config and the PD stage builder
    all ask: a decode server's, over its radix cache. Raises ValueError with one sentence."""
    if enabled and mode != "decode":
        raise ValueError(f"{DECODE_RADIX_FLAG} is for --disaggregation-mode decode only (pdserve launch: "
                         f"--mode pd), got {mode}")
    if enabled and not prefix_cache:
        raise ValueError(f"{DECODE_RADIX_FLAG} needs the radix cache: drop --disable-radix-cache")


def default_thread_pool_size(cpu_count: int | None = None) -> int:
    """The seed's default: min(max(4, int(0.75 * cpu_count) // 8), 12)."""
    n = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return min(max(4, int(0.75 * n) // 8), 12)


@dataclass(frozen=True)
class DisaggConfig:
    mode: str = "null"  # null | prefill | decode
    backend: str = "tcp"  # a name in backends.BACKENDS: tcp | shm | fake | nixl | mooncake
    bootstrap_host: str = "127.0.0.1"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT  # 0 = any free port (tests)
    thread_pool_size: int = field(default_factory=default_thread_pool_size)
    queue_size: int = 4
    bootstrap_timeout: float = 300.0  # s a prefill room waits for decode's page list
    waiting_timeout: float = 300.0  # s a decode room waits for its KV after init
    heartbeat_interval: float = 5.0  # s between decode's /health polls of each prefill
    heartbeat_max_failure: int = 2  # consecutive misses that declare a prefill dead
    cluster_token: str | None = None
    fail_rate: float = 0.0  # test-only: probability that one queued send fails
    nixl_backend: str = "UCX"  # the NIXL backend plugin the agent creates
    mooncake_protocol: str = "tcp"  # tcp | rdma
    mooncake_metadata: str = "P2PHANDSHAKE"  # or an etcd:// / http:// metadata server URL
    ib_device: str | None = None  # RDMA device(s), e.g. "mlx5_0" (rdma protocol)
    failure_policy: str = "recompute"  # decode, on a failed transfer: run the prompt itself, or "error"
    # decode: match prompts against its own radix cache; only pages past the hit move
    # (--disaggregation-decode-enable-radix-cache, SGLang's name; engine/pd/decode.py)
    decode_enable_radix_cache: bool = False
    epoch: int = 1  # the server's role epoch: a live role switch bumps it (server/elastic.py); a route lookup
    # naming another epoch is refused (409, bootstrap.py), so a stale request never pairs with this server's KV

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"disaggregation mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"disaggregation transfer backend must be one of {tuple(BACKENDS)}, "
                             f"got {self.backend!r}")
        if not 0 <= self.bootstrap_port <= 65535:
            raise ValueError(f"bootstrap_port must be in 0..65535, got {self.bootstrap_port}")
        for name in ("thread_pool_size", "queue_size", "heartbeat_max_failure"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bootstrap_timeout", "waiting_timeout", "heartbeat_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {self.fail_rate}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"disaggregation failure policy must be one of {FAILURE_POLICIES}, "
                             f"got {self.failure_policy!r}")
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ValueError(f"mooncake protocol must be tcp or rdma, got {self.mooncake_protocol!r}")
        if not self.nixl_backend or not self.mooncake_metadata:
            raise ValueError("nixl_backend and mooncake_metadata must be non-empty")
        self.check_decode_radix_cache()
        if self.epoch < 1:
            raise ValueError(f"epoch must be >= 1, got {self.epoch}")
        if self.cluster_token is not None and not self.cluster_token:
            raise ValueError("cluster_token must be non-empty when set")

    def check_decode_radix_cache(self, prefix_cache: bool = True) -> None:
        """`check_decode_radix_cache` for this config (`prefix_cache`: the engine's radix cache is on)."""
        check_decode_radix_cache(self.decode_enable_radix_cache, self.mode, prefix_cache)

    @property
    def heartbeat_deadline(self) -> float:
        """Seconds after which a silent prefill is declared dead (interval x max failures)."""
        return self.heartbeat_interval * self.heartbeat_max_failure

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DisaggConfig:
        """The defaults, then the environment, then `overrides` (an override of None counts as
        not given, so CLI flags left unset fall through to the environment)."""
        env = os.environ if env is None else env
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown DisaggConfig field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for fname, (suffix, parse) in _ENV_KNOBS.items():
            raw, var = _lookup(env, suffix)
            if raw is not None:
                values[fname] = _parse(var, raw, parse)
        token = env.get(TOKEN_ENV)
        if token:
            values["cluster_token"] = token
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _lookup(env: Mapping[str, str], suffix: str) -> tuple[str | None, str]:
    for prefix in (ENV_PREFIX, ALIAS_PREFIX):
        var = prefix + suffix
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            return raw.strip(), var
    return None, ENV_PREFIX + suffix


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError
    return value


def _rate(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError
    return value


_EXPECTED = {_positive_int: "an integer >= 1", _positive_float: "a number of seconds > 0",
             _rate: "a probability in [0, 1]", str: "a string"}

_ENV_KNOBS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "thread_pool_size": ("THREAD_POOL_SIZE", _positive_int),
    "queue_size": ("QUEUE_SIZE", _positive_int),
    "bootstrap_timeout": ("BOOTSTRAP_TIMEOUT", _positive_float),
    "waiting_timeout": ("WAITING_TIMEOUT", _positive_float),
    "heartbeat_interval": ("HEARTBEAT_INTERVAL", _positive_float),
    "heartbeat_max_failure": ("HEARTBEAT_MAX_FAILURE", _positive_int),
    "fail_rate": ("FAIL_RATE", _rate),
    "nixl_backend": ("NIXL_BACKEND", str),
    "mooncake_protocol": ("MOONCAKE_PROTOCOL", str),
    "mooncake_metadata": ("MOONCAKE_METADATA", str),
    "ib_device": ("IB_DEVICE", str),
    "failure_policy": ("FAILURE_POLICY", str),
}


def _parse(var: str, raw: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r}: expected {_EXPECTED[parse]}") from None
