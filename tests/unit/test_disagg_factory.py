"""create_manager: unknown and missing backends, and the checks every manager runs first."""

from __future__ import annotations

import sys

import pytest
import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import KVLayout
from pdserve.disagg.transfer import BackendUnavailable, create_manager

K = torch.zeros(2, 8 * 4, 2, 16)
LAYOUT = KVLayout.for_pool("tiny", K, 4)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown transfer backend 'rdma'"):
        create_manager("rdma", "prefill", K, K, 4, LAYOUT, DisaggConfig())


# what `import` must fail on to look like a machine without the extra (the meta package and the wheels)
MISSING = {"nixl": ["nixl", "nixl_cu12", "nixl_cu12._api", "nixl_cu13", "nixl_cu13._api"],
           "mooncake": ["mooncake", "mooncake.engine"]}


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_missing_optional_backend_is_one_line(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, f"pdserve.disagg.transfer.backends.{backend}", raising=False)
    for name in MISSING[backend]:
        monkeypatch.setitem(sys.modules, name, None)  # "import name" raises ModuleNotFoundError
    with pytest.raises(BackendUnavailable) as err:
        create_manager(backend, "decode", K, K, 4, LAYOUT, DisaggConfig())
    msg = str(err.value)
    assert backend in msg and f"pdserve[{backend}]" in msg and "\n" not in msg


def test_manager_checks_role_layout_and_shm_pool() -> None:
    with pytest.raises(ValueError, match="role"):
        create_manager("fake", "both", K, K, 4, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="page_size"):
        create_manager("fake", "decode", K, K, 8, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="dtype"):
        create_manager("fake", "decode", K.half(), K.half(), 4, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="allocate_shared_pool"):
        create_manager("shm", "decode", K, K.clone(), 4, LAYOUT, DisaggConfig())
