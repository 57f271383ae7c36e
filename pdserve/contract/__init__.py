"""What the router and the server both speak (stdlib + msgspec only, like `kv_events`).

The router never imports the server (nor torch); the two agree on the names below instead of
spelling them twice: the extra body fields a router adds to a request, the rule that puts a
PD room on a prefill dp rank, how many sequences (rooms) a request carries, the API-key
variable and the default ports. `/server_info`'s struct lives here too (server_info.py).
"""

from pdserve.contract.fields import (
    API_KEY_ENV,
    BOOTSTRAP_HOST,
    BOOTSTRAP_KEYS,
    BOOTSTRAP_PORT,
    BOOTSTRAP_ROOM,
    DEFAULT_BOOTSTRAP_PORT,
    DEFAULT_ROUTER_PORT,
    DEFAULT_SERVER_PORT,
    prefill_dp_rank,
)

__all__ = ["API_KEY_ENV", "BOOTSTRAP_HOST", "BOOTSTRAP_KEYS", "BOOTSTRAP_PORT", "BOOTSTRAP_ROOM",
           "DEFAULT_BOOTSTRAP_PORT", "DEFAULT_ROUTER_PORT", "DEFAULT_SERVER_PORT", "prefill_dp_rank"]
