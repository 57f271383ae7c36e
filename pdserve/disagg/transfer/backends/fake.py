"""The fake backend: the full control plane (sessions, RoomInfo, Done with metadata, Ack,
aborts, timeouts, failure injection) with no page I/O at all.

Lifecycle: as every SessionTransferManager; `write_pages` moves nothing, so the decode reaches
Success right after the prefill's last send, holding the prefill's MetadataRecord, and its
pages are left untouched. Use it for tests of the queues/state machine and for warm-up.
"""

from __future__ import annotations

from pdserve.disagg.transfer.sessions.manager import SessionTransferManager


class FakeTransferManager(SessionTransferManager):
    backend_name = "fake"
    one_sided = False
