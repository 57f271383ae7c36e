"""pdserve.bench.arrivals: gamma/Poisson arrival times."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.bench.arrivals import arrival_offsets


@pytest.mark.parametrize("rate", [2.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measured_rate_matches(rate: float, seed: int) -> None:
    offsets = arrival_offsets(5000, rate, seed=seed)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    measured = (len(offsets) - 1) / offsets[-1]
    assert measured == pytest.approx(rate, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_burstiness_sets_the_variance(burstiness: float) -> None:
    gaps = np.diff(arrival_offsets(20000, 10.0, burstiness=burstiness, seed=3))
    cv2 = gaps.var() / gaps.mean() ** 2
    assert cv2 == pytest.approx(1.0 / burstiness, rel=0.1)
    assert 1.0 / gaps.mean() == pytest.approx(10.0, rel=0.05)


def test_inf_rate_is_all_at_once() -> None:
    assert arrival_offsets(7, math.inf) == [0.0] * 7
    assert arrival_offsets(0, 5.0) == []
    assert arrival_offsets(1, 5.0) == [0.0]


def test_seeded_determinism() -> None:
    assert arrival_offsets(100, 3.0, 0.5, seed=7) == arrival_offsets(100, 3.0, 0.5, seed=7)
    assert arrival_offsets(100, 3.0, 0.5, seed=7) != arrival_offsets(100, 3.0, 0.5, seed=8)


@pytest.mark.parametrize("kwargs", [{"n": -1, "request_rate": 1.0}, {"n": 3, "request_rate": 0.0},
                                    {"n": 3, "request_rate": 1.0, "burstiness": 0.0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        arrival_offsets(**kwargs)
