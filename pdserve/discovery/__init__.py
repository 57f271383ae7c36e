"""Discovery: servers register themselves in etcd, routers watch (bottom package: no torch, no engine).

    server:  Registration(cfg, WorkerRecord(...)).start()   ...   .stop()   (deregisters)
    router:  Watcher(cfg, on_change).start()   on_change(Change("added" | "updated" | "removed", key, record))

`cfg` comes from `parse_discovery_url("etcd://HOST:PORT[/PREFIX]")`. The record struct is
`pdserve.contract.WorkerRecord` (what router and server agree on). etcd is reached through
etcd3gw (its v3 HTTP/JSON gateway); see store.py.
"""

from pdserve.discovery.config import DEFAULT_TTL_S, MIN_TTL_S, DiscoveryConfig, parse_discovery_url
from pdserve.discovery.registration import Registration
from pdserve.discovery.watcher import ADDED, REMOVED, UPDATED, Change, Watcher

__all__ = ["ADDED", "DEFAULT_TTL_S", "MIN_TTL_S", "REMOVED", "UPDATED", "Change", "DiscoveryConfig", "Registration",
           "Watcher", "parse_discovery_url"]
