"""Prefill/decode disaggregation: config, wire messages, bootstrap server/client, KV transfer.

A transport library: it knows nothing of the engine. The engine's PD stages (pdserve/engine/pd)
use it through `pdserve.disagg.transfer.create_manager` (one manager per rank), `BootstrapServer`
(prefill) and `BootstrapClient` (decode). transfer/base.py has the per-room lifecycle and
docs/architecture.md the protocol.

The names below load lazily: `pdserve.disagg.config` (read by `pdserve serve --help`) must not
pull in torch through the wire messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.disagg.config import DisaggConfig
    from pdserve.disagg.messages import KVLayout, LayoutMismatch, MetadataRecord

__all__ = ["DisaggConfig", "KVLayout", "LayoutMismatch", "MetadataRecord"]


def __getattr__(name: str) -> Any:
    if name == "DisaggConfig":
        from pdserve.disagg.config import DisaggConfig

        return DisaggConfig
    if name in ("KVLayout", "LayoutMismatch", "MetadataRecord"):
        from pdserve.disagg import messages

        return getattr(messages, name)
    raise AttributeError(f"module 'pdserve.disagg' has no attribute {name!r}")
