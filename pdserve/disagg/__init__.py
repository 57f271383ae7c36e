"""Prefill/decode disaggregation: config, wire messages, bootstrap server/client, KV transfer.

The engine uses this package through `pdserve.disagg.transfer.create_manager` (one manager per
rank), `BootstrapServer` (prefill) and `BootstrapClient` (decode); see transfer/base.py for the
per-room lifecycle and DESIGN.md sections 5-6 for the protocol.
"""

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout, LayoutMismatch, MetadataRecord

__all__ = ["DisaggConfig", "KVLayout", "LayoutMismatch", "MetadataRecord"]
