"""DisaggConfig: defaults, env knobs, SGLANG_* aliases (PDSERVE wins), overrides, bad values."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.disagg.config import DisaggConfig, default_thread_pool_size


def test_defaults() -> None:
    c = DisaggConfig.from_env({})
    assert (c.mode, c.backend, c.bootstrap_host, c.bootstrap_port) == ("null", "tcp", "127.0.0.1", 8998)
    assert (c.queue_size, c.bootstrap_timeout, c.waiting_timeout) == (4, 300.0, 300.0)
    assert (c.heartbeat_interval, c.heartbeat_max_failure, c.cluster_token, c.fail_rate) == (5.0, 2, None, 0.0)
    assert c.thread_pool_size == default_thread_pool_size()
    assert c.heartbeat_deadline == 10.0


@pytest.mark.parametrize("cpus, expected", [(1, 4), (2, 4), (64, 6), (128, 12), (1024, 12)])
def test_thread_pool_default_formula(cpus: int, expected: int) -> None:
    assert default_thread_pool_size(cpus) == expected


def test_env_knobs_and_aliases() -> None:
    env = {
        "PDSERVE_DISAGGREGATION_THREAD_POOL_SIZE": "7",
        "SGLANG_DISAGGREGATION_QUEUE_SIZE": "2",  # alias only
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "9",
        "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "2.5",  # PDSERVE wins
        "PDSERVE_DISAGGREGATION_WAITING_TIMEOUT": "11",
        "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
        "PDSERVE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "3",
        "PDSERVE_DISAGGREGATION_FAIL_RATE": "0.05",
        "PDSERVE_CLUSTER_TOKEN": "s3cret",
    }
    c = DisaggConfig.from_env(env)
    assert (c.thread_pool_size, c.queue_size, c.bootstrap_timeout, c.waiting_timeout) == (7, 2, 2.5, 11.0)
    assert (c.heartbeat_interval, c.heartbeat_max_failure, c.fail_rate, c.cluster_token) == (0.5, 3, 0.05, "s3cret")


def test_overrides_beat_env_and_none_falls_through() -> None:
    env = {"PDSERVE_DISAGGREGATION_QUEUE_SIZE": "2", "PDSERVE_CLUSTER_TOKEN": "t"}
    c = DisaggConfig.from_env(env, mode="decode", backend="shm", queue_size=8, cluster_token=None)
    assert (c.mode, c.backend, c.queue_size, c.cluster_token) == ("decode", "shm", 8, "t")


@pytest.mark.parametrize("var, raw, words", [
    ("PDSERVE_DISAGGREGATION_QUEUE_SIZE", "0", "integer >= 1"),
    ("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE", "four", "integer >= 1"),
    ("PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "-1", "seconds > 0"),
    ("PDSERVE_DISAGGREGATION_HEARTBEAT_INTERVAL", "nan", "seconds > 0"),
    ("PDSERVE_DISAGGREGATION_FAIL_RATE", "1.5", "probability"),
])
def test_bad_env_values_name_the_variable(var: str, raw: str, words: str) -> None:
    with pytest.raises(ValueError) as err:
        DisaggConfig.from_env({var: raw})
    assert var in str(err.value) and repr(raw) in str(err.value) and words in str(err.value)


def test_bad_fields_and_frozen() -> None:
    with pytest.raises(ValueError, match="mode"):
        DisaggConfig(mode="both")
    with pytest.raises(ValueError, match="backend"):
        DisaggConfig(backend="rdma")
    with pytest.raises(ValueError, match="heartbeat_max_failure"):
        DisaggConfig(heartbeat_max_failure=0)
    with pytest.raises(TypeError, match="bogus"):
        DisaggConfig.from_env({}, bogus=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DisaggConfig().queue_size = 3  # type: ignore[misc]
