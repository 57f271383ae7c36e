"""pdserve/contract: what the router writes is what the server reads, through one set of names."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.contract import (BODY_FIELDS, BOOTSTRAP_EPOCH, BOOTSTRAP_KEYS, DRAINING, EPOCH, FAILURE_POLICY,
                              RESUME_IDS, STALE_EPOCH, STREAM_IDS, ServerInfo, decode_server_info, encode_server_info,
                              error_code_is, per_sequence, prefill_dp_rank, resolve_api_key, sequence_count)
from pdserve.router.pd import batch_size, inject_bootstrap, with_epoch
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


def test_the_server_models_take_exactly_the_contract_body_fields() -> None:
    names = {name for name, _, _ in BODY_FIELDS}
    assert set(BOOTSTRAP_KEYS) | {STREAM_IDS, RESUME_IDS} <= names
    for model in (CompletionRequest, ChatCompletionRequest, GenerateRequest):
        assert names <= set(model.model_fields), model
        for name, _, default in BODY_FIELDS:
            assert model.model_fields[name].default == default, (model, name)


def test_a_body_the_router_writes_is_one_the_server_pairs() -> None:
    """The router's room lists have one entry per sequence (prompts x n); the server reads them back."""

    class Prefill:
        bootstrap_host, bootstrap_port, epoch = "10.0.0.7", 8998, None

    body = {"prompt": ["a", "b"], "n": 3}
    count = batch_size(body)
    assert count == sequence_count(2, 3) == 6
    wire = msgspec.json.decode(inject_bootstrap(body, Prefill(), count, track=True))  # type: ignore[arg-type]
    parsed = CompletionRequest.model_validate(wire)
    assert parsed.pdserve_stream_ids is True and len(parsed.bootstrap_room) == 6
    assert per_sequence(parsed.bootstrap_room, 2, 3) == wire["bootstrap_room"]
    assert batch_size({"prompt": "a"}) is None  # scalar fields for one sequence


def test_each_leg_names_its_worker_epoch_and_both_the_prefill_one() -> None:
    """A PD body names the prefill's role epoch (the decode's route lookup carries it) and each leg its
    own worker's; a client's own EPOCH field never reaches a worker; unknown epochs add nothing."""

    class Worker:
        def __init__(self, epoch: int | None) -> None:
            self.bootstrap_host, self.bootstrap_port, self.epoch = "10.0.0.7", 8998, epoch

    prefill, decode = Worker(3), Worker(5)
    shared = inject_bootstrap({"prompt": "a", EPOCH: 99}, prefill, None)  # type: ignore[arg-type]
    p_leg = CompletionRequest.model_validate(msgspec.json.decode(with_epoch(shared, prefill)))  # type: ignore[arg-type]
    d_leg = CompletionRequest.model_validate(msgspec.json.decode(with_epoch(shared, decode)))  # type: ignore[arg-type]
    assert (getattr(p_leg, EPOCH), getattr(p_leg, BOOTSTRAP_EPOCH)) == (3, 3)
    assert (getattr(d_leg, EPOCH), getattr(d_leg, BOOTSTRAP_EPOCH)) == (5, 3)
    unknown = inject_bootstrap({"prompt": "a"}, Worker(None), None)  # type: ignore[arg-type]
    assert with_epoch(unknown, Worker(None)) == unknown  # type: ignore[arg-type]
    assert EPOCH not in msgspec.json.decode(unknown) and BOOTSTRAP_EPOCH not in msgspec.json.decode(unknown)


def test_error_codes_are_found_in_either_json_spelling() -> None:
    body = msgspec.json.encode({"error": {"message": "m", "code": STALE_EPOCH}})
    assert error_code_is(body, STALE_EPOCH) and not error_code_is(body, DRAINING)
    assert error_code_is(b'{"error": {"code": "draining"}}', DRAINING)


def test_per_sequence_pairs_scalars_prompt_lists_and_sequence_lists() -> None:
    assert per_sequence(5, 2, 2) == [5, 5, 5, 5]
    assert per_sequence([1, 2], 2, 3) == [1, 1, 1, 2, 2, 2]  # one per prompt: its n choices share it
    assert per_sequence([1, 2, 3, 4], 2, 2) == [1, 2, 3, 4]  # index p * n + j
    with pytest.raises(ValueError, match="3 values; the request has 4 sequences"):
        per_sequence([1, 2, 3], 2, 2)


def test_server_info_round_trip_and_foreign_workers() -> None:
    info = ServerInfo(disaggregation_mode="decode", disaggregation_failure_policy="recompute",
                      kv_events_endpoint="tcp://127.0.0.1:5557", dp_size=2, epoch=4, draining=True)
    body = msgspec.json.encode(encode_server_info(info, {"engine_pid": 7, "uptime_s": 1.5}))
    assert FAILURE_POLICY in msgspec.json.decode(body)
    back = decode_server_info(body)
    assert back == info and back is not None and back.recomputes
    # a SGLang worker (or a mock) says less, or spells the port the older way: defaults fill in
    sglang = decode_server_info(b'{"bootstrap_port": 9001, "tp_size": 2, "some_other_key": [1]}')
    assert sglang is not None and sglang.prefill_bootstrap_port() == 9001 and not sglang.recomputes
    assert ServerInfo(disaggregation_bootstrap_port=70000).prefill_bootstrap_port() is None
    for junk in (b"[1, 2]", b"not json", b'{"tp_size": "many"}'):
        assert decode_server_info(junk) is None


def test_prefill_dp_rank_and_api_key() -> None:
    assert [prefill_dp_rank(room, 3) for room in (0, 1, 5, 2**63 - 1)] == [0, 1, 2, (2**63 - 1) % 3]
    assert resolve_api_key("flag", {"PDSERVE_API_KEY": "env"}) == "flag"
    assert resolve_api_key(None, {"PDSERVE_API_KEY": "env"}) == "env"
    assert resolve_api_key(None, {"PDSERVE_API_KEY": ""}) is None and resolve_api_key(None, {}) is None
