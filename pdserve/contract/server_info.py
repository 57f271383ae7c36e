"""`GET /server_info`: the keys a server reports and a router reads, as one struct.

The server fills a `ServerInfo` and answers it with its own keys beside it (config, engine,
uptime: the router reads none of those). The router decodes any worker's answer with
`decode_server_info`: unknown keys are ignored and every field has a default, so a SGLang
worker, a mock, or an older pdserve decodes too; a body that is not such an object is None.
Names are SGLang's server-args names where it has them.
"""

from __future__ import annotations

import msgspec

FAILURE_POLICY = "disaggregation_failure_policy"  # a decode's answer to a failed KV transfer
RECOMPUTE = "recompute"  # ... the decode runs the prompt itself (the other policy: "error", a 503)
MODE_OF_ROLE = {"regular": "null", "prefill": "prefill", "decode": "decode"}  # router role -> mode


class ServerInfo(msgspec.Struct, kw_only=True):
    """What a router may learn of a worker (defaults: what a worker that does not say means)."""

    disaggregation_mode: str | None = None  # null | prefill | decode
    disaggregation_transfer_backend: str | None = None
    disaggregation_bootstrap_port: int | None = None  # a prefill's bootstrap server
    bootstrap_port: int | None = None  # an older spelling of the same port, read when the other is absent
    disaggregation_failure_policy: str | None = None  # decode: recompute | error
    disaggregation_decode_enable_radix_cache: bool = False
    kv_events_endpoint: str | None = None  # where its KV events are published (None: it publishes none)
    max_model_len: int | None = None
    tp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    load_balance_method: str | None = None
    epoch: int | None = None  # its role epoch (a live role switch bumps it; None: it does not say)
    draining: bool = False  # it finishes what it runs and takes nothing new (POST /drain, /switch_role)

    def prefill_bootstrap_port(self) -> int | None:
        """The bootstrap port a prefill reports, if a valid one."""
        port = self.disaggregation_bootstrap_port if self.disaggregation_bootstrap_port is not None \
            else self.bootstrap_port
        return port if port is not None and 0 < port < 65536 else None

    @property
    def recomputes(self) -> bool:
        """Does this decode run the prompt itself when its KV transfer fails?"""
        return self.disaggregation_failure_policy == RECOMPUTE


_decoder = msgspec.json.Decoder(ServerInfo, strict=False)


def decode_server_info(raw: bytes) -> ServerInfo | None:
    """A worker's `/server_info` body, or None when it is not a JSON object of these keys."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None


def encode_server_info(info: ServerInfo, extra: dict[str, object]) -> dict[str, object]:
    """The server's answer: the shared keys, with its own keys (`extra`) beside them."""
    return {**msgspec.structs.asdict(info), **extra}
