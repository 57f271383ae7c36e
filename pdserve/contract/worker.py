"""The worker record a server registers in the discovery store and a router reads back.

One record per server, JSON-encoded (msgspec) as the value of its key
`<prefix>/workers/<host>:<port>`; the key lives under the server's lease, so it vanishes when
the server dies. The router turns a record into a worker of its registry: `role` decides the
set, `url` the address, `bootstrap_host`/`bootstrap_port` what a PD request to a prefill
carries. `epoch` starts at 1 and grows each time the server changes role (a record at a higher
epoch replaces the one before). `lease_ttl_s` tells a watcher how long the server may take to
come back after the store lost its keys (a restarted, emptied store), so it does not drop the
worker at once.
"""

from __future__ import annotations

import msgspec

WORKER_ROLES = ("regular", "prefill", "decode")  # regular: a unified server (--disaggregation-mode null)


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    role: str  # one of WORKER_ROLES
    url: str  # http://host:port, as routers reach it
    model: str  # the served model name (/v1/models)
    bootstrap_host: str | None = None  # prefill: where its bootstrap server listens
    bootstrap_port: int | None = None  # prefill only
    tp_size: int = 1
    dp_size: int = 1
    transfer_backend: str | None = None  # PD: tcp | shm | nixl | mooncake | fake
    kv_events_endpoint: str | None = None  # tcp://host:port of its KV-event publisher, if any
    epoch: int = 1
    lease_ttl_s: int = 5  # seconds
    pid: int = 0  # of the HTTP front, for operators (not used for routing)

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"worker role {self.role!r}: expected one of {', '.join(WORKER_ROLES)}")
        if not self.url.startswith("http://"):
            raise ValueError(f"worker url {self.url!r}: expected http://host:port")
        if self.bootstrap_port is not None and self.role != "prefill":
            raise ValueError("bootstrap_port belongs to a prefill record only")
        if self.epoch < 1 or self.lease_ttl_s <= 0 or self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("epoch, tp/dp sizes >= 1 and lease TTL > 0")


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerRecord)


def encode_record(record: WorkerRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> WorkerRecord:
    """Raises ValueError (msgspec.ValidationError / DecodeError are ValueErrors) on a bad value."""
    return _decoder.decode(data)
