"""`--discovery etcd://HOST:PORT[/PREFIX]`: where the store is, and the timings of registration and watch.

Keys (one per server, under its lease):

    <prefix>/workers/<host>:<port>   ->  WorkerRecord (JSON, pdserve/contract/worker.py)

e.g. `etcd://10.0.0.5:2379/team-a` puts workers under `/team-a/workers/`; without a path the
prefix is `/pdserve`. Two clusters share one etcd by using two prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ETCD_PORT = 2379
DEFAULT_PREFIX = "/pdserve"
DEFAULT_TTL_S = 5
MIN_TTL_S = 2  # etcd raises shorter leases to 1.5 election timeouts (1.5 s by default)


@dataclass(frozen=True)
class DiscoveryConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_ETCD_PORT
    prefix: str = DEFAULT_PREFIX  # starts with "/", no trailing "/"
    ttl_s: int = DEFAULT_TTL_S  # a server's lease: its key vanishes this long after it dies
    timeout_s: float = 2.0  # one call to etcd
    check_interval_s: float = 1.0  # watcher: liveness check of etcd and the watch stream; also the longest
    # keepalive period of a registration (it refreshes every min(ttl_s / 3, this))

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise ValueError(f"discovery: bad etcd address {self.host!r}:{self.port}")
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"discovery prefix {self.prefix!r}: expected /name (no trailing /)")
        if self.ttl_s < MIN_TTL_S:
            raise ValueError(f"discovery TTL must be >= {MIN_TTL_S} s (etcd's shortest lease), got {self.ttl_s}")
        if self.timeout_s <= 0 or self.check_interval_s <= 0:
            raise ValueError("discovery timeout and check interval must be > 0")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{host}:{self.port}{self.prefix}"

    @property
    def workers_prefix(self) -> str:
        return f"{self.prefix}/workers/"

    def key_for(self, worker_url: str) -> str:
        """The key of the worker at `worker_url` (http://host:port)."""
        return self.workers_prefix + worker_url.split("://", 1)[-1].rstrip("/")

    @property
    def keepalive_s(self) -> float:
        return min(self.ttl_s / 3, self.check_interval_s)


def parse_discovery_url(text: str, ttl_s: int = DEFAULT_TTL_S) -> DiscoveryConfig:
    """`etcd://HOST[:PORT][/PREFIX]` -> DiscoveryConfig; ValueError with one line otherwise."""
    parts = urlsplit(text.strip())
    if parts.scheme != "etcd":
        raise ValueError(f"--discovery {text!r}: expected etcd://HOST:PORT[/PREFIX]")
    try:
        port = parts.port or DEFAULT_ETCD_PORT
    except ValueError:
        raise ValueError(f"--discovery {text!r}: bad port") from None
    if not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"--discovery {text!r}: expected etcd://HOST:PORT[/PREFIX]")
    prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
    return DiscoveryConfig(host=parts.hostname, port=port, prefix=prefix, ttl_s=ttl_s)
