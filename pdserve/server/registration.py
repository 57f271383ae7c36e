"""`pdserve serve --discovery etcd://...`: the server's record in the discovery store, for its lifetime.

Lifecycle (driven by http_server.py through server/elastic.py, which also deregisters on a drain and
registers the new role and epoch after a live role switch):
  - ready: once uvicorn serves the socket (the engine loaded, /health answers 200),
    `register(config, state)` builds the record from the config and what the engine reported
    and starts a `Registration` (pdserve/discovery): lease, record, keepalive thread. etcd
    being down is no reason not to serve: it keeps trying in the background;
  - first SIGTERM/SIGINT: `deregister_soon(reg)` revokes the lease from a helper thread (the
    signal handler must not block), so routers stop picking this server while it shuts down;
  - exit: `reg.stop()` again waits (bounded) for that to finish; a server that dies instead
    just stops refreshing, and its key goes with the lease.
"""

from __future__ import annotations

import os
import socket
import threading

from pdserve.contract import WorkerRecord
from pdserve.discovery import Registration
from pdserve.server.config import ServerConfig
from pdserve.server.state import ServerState

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def advertised_host(config: ServerConfig) -> str:
    """The address routers use: --discovery-advertise-host, else --host unless it is a wildcard, else this
    machine's name."""
    host = config.advertise_host or config.host
    return socket.getfqdn() if host in WILDCARDS else host


def worker_record(config: ServerConfig, state: ServerState) -> WorkerRecord:
    assert config.discovery is not None
    host = advertised_host(config)
    pd = config.disagg
    prefill = pd.mode == "prefill"
    boot_host = pd.bootstrap_host if pd.bootstrap_host not in WILDCARDS else host
    return WorkerRecord(
        role={"null": "regular"}.get(pd.mode, pd.mode), url=f"http://{f'[{host}]' if ':' in host else host}:"
                                                              f"{config.port}",
        model=state.model_name, bootstrap_host=boot_host if prefill else None,
        bootstrap_port=pd.bootstrap_port if prefill else None, tp_size=config.engine.tp_size,
        dp_size=config.engine.dp_size, transfer_backend=pd.backend if pd.mode != "null" else None,
        kv_events_endpoint=state.info.kv_events_endpoint, epoch=pd.epoch, lease_ttl_s=config.discovery.ttl_s,
        pid=os.getpid())


def register(config: ServerConfig, state: ServerState) -> Registration:
    assert config.discovery is not None
    return Registration(config.discovery, worker_record(config, state)).start()


def deregister_soon(reg: Registration) -> None:
    threading.Thread(target=reg.stop, name="pdserve-deregister", daemon=True).start()
