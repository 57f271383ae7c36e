"""create_manager: unknown and missing backends, and the checks every manager runs first."""

from __future__ import annotations

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


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_missing_optional_backend_is_one_line(backend: str) -> None:
    with pytest.raises(BackendUnavailable) as err:
        create_manager(backend, "decode", K, K, 4, LAYOUT, DisaggConfig())
    assert backend in str(err.value) and "\n" not in str(err.value)


def test_manager_checks_role_layout_and_shm_pool() -> None:
    with pytest.raises(ValueError, match="role"):
        create_manager("fake", "both", K, K, 4, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="page_size"):
        create_manager("fake", "decode", K, K, 8, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="dtype"):
        create_manager("fake", "decode", K.half(), K.half(), 4, LAYOUT, DisaggConfig())
    with pytest.raises(ValueError, match="allocate_shared_pool"):
        create_manager("shm", "decode", K, K.clone(), 4, LAYOUT, DisaggConfig())
