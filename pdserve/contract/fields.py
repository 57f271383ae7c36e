"""Names and rules shared by router and server (see the package docstring)."""

from __future__ import annotations

API_KEY_ENV = "PDSERVE_API_KEY"  # the key of `--api-key` when the flag is absent (server, router, launch)

DEFAULT_SERVER_PORT = 30000  # `pdserve serve` (SGLang's)
DEFAULT_ROUTER_PORT = 8000  # `pdserve router` / `pdserve launch`
DEFAULT_BOOTSTRAP_PORT = 8998  # a prefill server's bootstrap server (SGLang's)

# the PD fields a router adds to the body (SGLang's names); a scalar, or one per sequence
BOOTSTRAP_HOST = "bootstrap_host"
BOOTSTRAP_PORT = "bootstrap_port"
BOOTSTRAP_ROOM = "bootstrap_room"
BOOTSTRAP_KEYS = (BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM)


def prefill_dp_rank(room: int, dp_size: int) -> int:
    """The prefill dp rank that holds a room's KV (SGLang's convention): the prefill's DP front
    places the request there and the decode fetches the room's pages from it."""
    return room % dp_size
