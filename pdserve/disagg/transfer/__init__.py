"""KV transfer backends behind one interface (see base.py for the lifecycle)."""

from pdserve.disagg.transfer.base import (BackendUnavailable, KVPoll, KVReceiver, KVSender, TransferManager,
                                          advance, create_manager)

__all__ = ["BackendUnavailable", "KVPoll", "KVReceiver", "KVSender", "TransferManager", "advance",
           "create_manager"]
