"""The one list of KV transfer backends: their names, where each lives, and what it needs.

Lifecycle: `DisaggConfig` checks a configured backend name against `BACKENDS` (so this module
stays cheap: strings only, no torch and no backend import); `transfer.base.create_manager`
imports the named module on first use and, when an optional dependency is missing, says what to
install (`install`); `missing_extra` says it before any process starts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    module: str  # the module that defines the manager class
    cls: str  # the TransferManager subclass in it
    install: str | None = None  # what to install when the module's dependency is missing
    packages: tuple[str, ...] = ()  # one of these top-level packages must be installed (an optional extra)


BACKENDS: dict[str, Backend] = {
    "tcp": Backend("pdserve.disagg.transfer.backends.tcp", "TcpTransferManager"),
    "shm": Backend("pdserve.disagg.transfer.backends.shm", "ShmTransferManager"),
    "fake": Backend("pdserve.disagg.transfer.backends.fake", "FakeTransferManager"),
    "nixl": Backend("pdserve.disagg.transfer.backends.nixl", "NixlTransferManager",
                    "pip install 'pdserve[nixl]' (the nixl-cu12 wheel; it also runs on CPU)",
                    ("nixl", "nixl_cu12", "nixl_cu13")),
    "mooncake": Backend("pdserve.disagg.transfer.backends.mooncake", "MooncakeTransferManager",
                        "pip install 'pdserve[mooncake]' (mooncake-transfer-engine-non-cuda; "
                        "needs the system library libibverbs1: apt-get install libibverbs1)", ("mooncake",)),
}


def missing_extra(name: str) -> str | None:
    """One line naming the extra to install when backend `name`'s optional package is absent
    (a cheap look-up: nothing is imported), else None. `pdserve serve` and `launch` check it
    before anything starts."""
    entry = BACKENDS[name]
    if not entry.packages or any(importlib.util.find_spec(p) is not None for p in entry.packages):
        return None
    return f"transfer backend {name!r} needs the optional extra pdserve[{name}]: {entry.install}"
