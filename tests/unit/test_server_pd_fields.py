"""PD bootstrap fields on a server: scalars or lists (one per sequence, SGLang's batched form)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.server.errors import APIError
from pdserve.server.params import pd_bootstrap
from pdserve.server.protocol import CompletionRequest, GenerateRequest


def state(mode: str = "prefill") -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(disagg=SimpleNamespace(mode=mode)))


def body(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **kw})


def test_lists_give_one_room_per_sequence() -> None:
    b = body(bootstrap_host=["h1", "h2", "h3", "h4"], bootstrap_port=[1, 2, 3, 4], bootstrap_room=[10, 11, 12, 13])
    boots = pd_bootstrap(state(), b, 2, 2)
    assert [(x.host, x.port, x.room) for x in boots] == [("h1", 1, 10), ("h2", 2, 11), ("h3", 3, 12), ("h4", 4, 13)]


def test_scalar_and_per_prompt_rooms_derive_distinct_rooms_for_the_copies() -> None:
    boots = pd_bootstrap(state(), body(bootstrap_host="h", bootstrap_port=9, bootstrap_room=5), 1, 4)
    assert boots[0].room == 5 and len({x.room for x in boots}) == 4 and {x.host for x in boots} == {"h"}
    assert all(0 <= x.room < 2**63 for x in boots)
    again = pd_bootstrap(state("decode"), body(bootstrap_host="h", bootstrap_port=9, bootstrap_room=5), 1, 4)
    assert [x.room for x in again] == [x.room for x in boots]  # both legs derive the same rooms
    per_prompt = pd_bootstrap(state(), body(bootstrap_host=["a", "b"], bootstrap_port=9, bootstrap_room=[7, 8]), 2, 3)
    assert [x.host for x in per_prompt] == ["a"] * 3 + ["b"] * 3
    assert [x.room for x in per_prompt][::3] == [7, 8] and len({x.room for x in per_prompt}) == 6


def test_unified_ignores_and_bad_lists_are_400() -> None:
    assert pd_bootstrap(state("null"), body(bootstrap_host=["h"], bootstrap_port=[1], bootstrap_room=[1]), 1, 1) is None
    assert pd_bootstrap(state(), body(), 1, 1) is None
    for kw, param in [({"bootstrap_room": [1, 2, 3]}, "bootstrap_room"), ({"bootstrap_port": [1, 2, 3]}, "bootstrap_port"),
                      ({"bootstrap_room": [1, 1]}, "bootstrap_room"), ({"bootstrap_port": [0, 1]}, "bootstrap_port"),
                      ({"bootstrap_room": None}, "bootstrap_room")]:
        fields = {"bootstrap_host": "h", "bootstrap_port": [5, 6], "bootstrap_room": [1, 2], **kw}
        with pytest.raises(APIError) as exc:
            pd_bootstrap(state(), body(**fields), 1, 2)
        assert exc.value.status == 400 and exc.value.param == param, (kw, exc.value.param)


def test_generate_accepts_list_fields() -> None:
    g = GenerateRequest.model_validate({"text": ["a", "b"], "bootstrap_host": ["h", "h"], "bootstrap_port": [1, 1],
                                        "bootstrap_room": [3, 4]})
    assert [x.room for x in pd_bootstrap(state(), g, 2, 1)] == [3, 4]
