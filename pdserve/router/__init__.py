"""pdserve's router: load balancing over unified workers, and PD pairing of prefill/decode workers.

Lifecycle: `pdserve router ...` (cli.py) builds a frozen `RouterConfig` (config.py) and runs
`serve()` (server.py): bind, start the `RouterApp` (app.py: registry + health checks,
policies, limiter, metrics, regular or PD forwarder), serve HTTP with the lean front server
(http/protocol.py) that forwards over pooled keep-alive connections (http/client.py), and stop
cleanly on SIGTERM/SIGINT. Control-plane calls (health, /get_load, /server_info) use aiohttp.
"""

from pdserve.router.config import RouterConfig, WorkerSpec

__all__ = ["RouterConfig", "WorkerSpec"]
