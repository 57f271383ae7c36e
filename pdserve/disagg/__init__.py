"""Prefill/decode disaggregation: config, wire messages, bootstrap server/client, KV transfer.

A transport library: it knows nothing of the engine. The engine's PD stages (pdserve/engine/pd)
use it through `pdserve.disagg.transfer.create_manager` (one manager per rank), `BootstrapServer`
(prefill) and `BootstrapClient` (decode). transfer/base.py has the per-room lifecycle and
docs/architecture.md the protocol.
"""

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, LayoutMismatch, MetadataRecord

__all__ = ["DisaggConfig", "KVLayout", "LayoutMismatch", "MetadataRecord"]
