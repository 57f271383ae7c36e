"""The one list of KV transfer backends: their names, where each lives, and what it needs.

Lifecycle: `DisaggConfig` checks a configured backend name against `BACKENDS` (so this module
stays cheap: strings only, no torch and no backend import); `transfer.base.create_manager`
imports the named module on first use and, when an optional dependency is missing, says what to
install (`install`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    module: str  # the module that defines the manager class
    cls: str  # the TransferManager subclass in it
    install: str | None = None  # what to install when the module's dependency is missing


BACKENDS: dict[str, Backend] = {
    "tcp": Backend("pdserve.disagg.transfer.backends.tcp", "TcpTransferManager"),
    "shm": Backend("pdserve.disagg.transfer.backends.shm", "ShmTransferManager"),
    "fake": Backend("pdserve.disagg.transfer.backends.fake", "FakeTransferManager"),
    "nixl": Backend("pdserve.disagg.transfer.backends.nixl", "NixlTransferManager",
                    "pip install 'pdserve[nixl]' (the nixl-cu12 wheel; it also runs on CPU)"),
    "mooncake": Backend("pdserve.disagg.transfer.backends.mooncake", "MooncakeTransferManager",
                        "pip install 'pdserve[mooncake]' (mooncake-transfer-engine-non-cuda; "
                        "needs the system library libibverbs1: apt-get install libibverbs1)"),
}
