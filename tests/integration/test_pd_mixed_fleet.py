"""A mixed fleet (issue 7, "What must hold"): one prefill server serves two decode servers at once,
under concurrent load, for each transfer backend that crosses processes (tcp, nixl, mooncake).

Per backend (module fixture): a prefill + decode pair plus a second decode on the same prefill.
16 PD requests, 8 at a time, alternate between the two decodes (so the prefill holds two control
sessions and two shard queues, and pushes KV to both pools at once); half are longer than the
chunk budget (KV pushed per chunk). Every decode output equals the unified engine's, token for
token; afterwards all three servers are idle with their pools back where they started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve import SamplingParams
from tests.integration.conftest import ServerProcess
from tests.integration.pd_cluster import PDPair, call, new_room, pool_mark, running_pair, wait_settled
from tests.integration.test_pd_server_equality import CHUNK, ENGINE_ARGS, ENGINE_KWARGS, SHORT, _long_text

MAX_NEW = 6
REQUESTS = 16
CONCURRENCY = 8


@pytest.fixture(scope="module")
def reference(bundled_model_dir: Path) -> Any:
    from pdserve import LLM

    return LLM("default", **ENGINE_KWARGS)


@pytest.fixture(scope="module", params=["tcp", "nixl", "mooncake"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          bundled_model_dir: Path) -> Iterator[tuple[PDPair, ServerProcess]]:
    with running_pair(tmp_path_factory.mktemp(f"fleet-{request.param}"), request.param, ENGINE_ARGS) as pair:
        second = pair.launch_extra_decode("b")
        try:
            second.wait_healthy()
            yield pair, second
        except BaseException:
            print(second.log_tail(40))
            raise
        finally:
            second.stop(timeout=15)


def _prompts(reference: Any) -> list[list[int]]:
    enc = reference.tokenizer.encode
    longs = [enc(_long_text(n, s)) for n, s in ((5, 1), (7, 2), (9, 3), (6, 4))]
    assert all(len(p) > CHUNK for p in longs)
    shorts = [enc(t) for t in SHORT]
    return [(longs[i // 2 % len(longs)] if i % 2 else shorts[i // 2 % len(shorts)]) + enc(f" #{i}")
            for i in range(REQUESTS)]


def test_one_prefill_serves_two_decodes_at_once(fleet: tuple[PDPair, ServerProcess], reference: Any) -> None:
    pair, second = fleet
    prefill, decodes = pair.server("prefill").url, [pair.server("decode").url, second.url]
    marks = {url: pool_mark(url) for url in (prefill, *decodes)}
    prompts = _prompts(reference)
    expected = reference.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0),
                                  use_tqdm=False)

    async def run() -> list[tuple[Any, Any]]:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=4 * CONCURRENCY)) as client:
            async def one(i: int) -> tuple[Any, Any]:
                body = {"input_ids": prompts[i], "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0},
                        "bootstrap_host": "127.0.0.1", "bootstrap_port": pair.bootstrap_port,
                        "bootstrap_room": new_room()}
                async with sem:
                    return await asyncio.gather(call(client, prefill, "/generate", body, False),
                                                call(client, decodes[i % 2], "/generate", body, False))

            return await asyncio.gather(*(one(i) for i in range(REQUESTS)))

    results = asyncio.run(run())
    for i, ((pre, dec), ref) in enumerate(zip(results, expected)):
        assert pre.ok, f"request {i} prefill: {pre.describe()}\n{pair.logs()}"
        assert dec.ok, f"request {i} decode {i % 2}: {dec.describe()}\n{pair.logs()}\n{second.log_tail(30)}"
        assert dec.json["output_ids"] == ref.output_ids, (i, dec.json["output_ids"], ref.output_ids)
    for url in (prefill, *decodes):
        wait_settled(url, marks[url])
