"""Chaos suite (issue 14): faults an operator causes, against one prefill + two decodes + a PD
router (tests/chaos/cluster.py; the session's cluster from tests/chaos/conftest.py, tests run in
file order and each leaves it whole but the last). Every test prints its figures.

  auth sweep        every route but health/metrics: 401 without and with a wrong key, on the
                    servers, the router and the bootstrap server (whose table is unchanged)
  disconnects       200 clients leave (streaming and not, at random moments): every server
                    idle with its pool back within 5 s, engine RSS +< 5%
  overload burst    300 requests at once at a router with a small queue: only 200/408/429
  SIGSTOP           a decode stopped for a while: every request ends (served or a clean error)
  kill -9 prefill   mid-transfer, decodes recompute: 0 client errors, outputs equal the
                    no-fault run; then 5% injected transfer failures: 0 client errors
  restart           a decode restarted at its address serves within 5 s of answering /health
  engine death      kill the engine process inside a server: 503s, the front exits non-zero
                    within 5 s
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from typing import Any

import httpx
import msgspec

from pdserve.disagg.messages import KVLayout
from pdserve.router.config import LimitsConfig
from pdserve.router.server import EmbeddedRouter
from tests.chaos.cluster import AUTH, KEY, Chaos, engine_pid, router_config, rss_kib
from tests.integration.conftest import ServerProcess
from tests.integration.pd_cluster import Reply, call, wait_for


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 40000) for _ in range(n)]


def gen(prompt: list[int], max_new: int) -> dict[str, Any]:
    return {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                     "ignore_eos": True}}


def output_ids(reply: Reply) -> list[int]:
    final = reply.final
    return list(final["output_ids"])


def reference(server: ServerProcess, bodies: list[dict[str, Any]]) -> list[list[int]]:
    """No-fault greedy outputs: the same bodies served locally (unified) by one server."""
    out = []
    for body in bodies:
        r = httpx.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        out.append(r.json()["output_ids"])
    return out


# --- auth -------------------------------------------------------------------------------------------

SERVER_ROUTES = [("POST", "/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                 ("GET", "/v1/models"), ("GET", "/server_info"), ("GET", "/get_server_info"), ("GET", "/model_info"),
                 ("GET", "/get_model_info"), ("GET", "/get_load"), ("POST", "/abort_request"),
                 ("POST", "/flush_cache"), ("GET", "/health_generate")]
ROUTER_ROUTES = [("POST", "/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                 ("GET", "/v1/models"), ("GET", "/server_info"), ("GET", "/workers"), ("POST", "/workers"),
                 ("DELETE", "/workers"), ("GET", "/get_loads"), ("POST", "/flush_cache"), ("GET", "/health_generate")]
BAD_KEYS: list[dict[str, str]] = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]


def test_auth_sweep(chaos: Chaos) -> None:
    seen: Counter[int] = Counter()
    checked = 0
    with httpx.Client(timeout=10) as c:
        targets = [(s.url, SERVER_ROUTES) for s in chaos.servers.values()] + [(chaos.router.url, ROUTER_ROUTES)]
        for base, routes in targets:
            for method, path in routes:
                for headers in BAD_KEYS:
                    r = c.request(method, base + path, headers=headers, json={"rid": "x", "url": "http://1.2.3.4:1"})
                    assert r.status_code == 401, (base, method, path, headers, r.status_code, r.text)
                    assert r.json()["error"]["message"], r.text
                    seen[r.status_code] += 1
                    checked += 1
            for path in ("/health", "/metrics"):  # open for probes and scrapers
                assert c.get(base + path).status_code == 200, (base, path)
        assert len(httpx.get(chaos.router.url + "/workers", headers=AUTH).json()["workers"]) == 3  # unchanged
        # the bootstrap server: PUT /route (route poisoning) and GET /route need the key too
        boot = f"http://127.0.0.1:{chaos.pair.bootstrap_port}"
        before = c.get(boot + "/route?rank=0", headers=AUTH).json()
        layout = KVLayout(model="x", num_layers=1, kv_heads=1, head_dim=8, dtype="float32", page_size=16)
        poison = msgspec.json.encode({"rank": 0, "endpoint": "127.0.0.1:1", "layout": layout})
        for headers in BAD_KEYS:
            for method, body in (("PUT", poison), ("GET", None)):
                r = c.request(method, boot + "/route?rank=0", headers=headers, content=body)
                assert r.status_code == 401, (method, headers, r.status_code, r.text)
                seen[r.status_code] += 1
                checked += 1
        assert c.get(boot + "/health").status_code == 200
        assert c.get(boot + "/route?rank=0", headers=AUTH).json() == before  # the table is unchanged
    print(f"auth sweep: {checked} unauthenticated calls, statuses {dict(seen)}")


# --- disconnects --------------------------------------------------------------------------------------

N_DISCONNECTS = 200


def test_200_client_disconnects_leave_nothing_behind(chaos: Chaos) -> None:
    pids = {name: engine_pid(s) for name, s in chaos.servers.items()}
    warm = [("/generate", gen(ids(60, 900 + i), 8), i % 2 == 0) for i in range(6)]
    assert all(r.ok for r in chaos.calls(warm, 6))
    chaos.settled()
    rng = random.Random(14)
    paths = ["/generate", "/v1/completions", "/v1/chat/completions"]

    def body(i: int) -> tuple[str, dict[str, Any]]:
        path = paths[i % 3]
        prompt = ids(rng.randint(20, 300), 1000 + i)
        if path == "/generate":
            return path, gen(prompt, 64)
        if path == "/v1/completions":
            return path, {"model": "default", "prompt": prompt, "max_tokens": 64, "temperature": 0}
        text = " ".join(str(t) for t in prompt[:60])
        return path, {"model": "default", "messages": [{"role": "user", "content": text}], "max_tokens": 64,
                      "temperature": 0}

    async def leave(client: httpx.AsyncClient, i: int, delay: float) -> str:
        path, b = body(i)
        task = asyncio.create_task(call(client, chaos.router.url, path, b, stream=i % 2 == 0, timeout=60))
        await asyncio.sleep(delay)
        if task.done():
            return "finished first"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return "left"

    async def run(waves: range) -> Counter[str]:
        limits = httpx.Limits(max_connections=N_DISCONNECTS + 8, max_keepalive_connections=0)
        outcomes: Counter[str] = Counter()
        async with httpx.AsyncClient(timeout=60, headers=AUTH, limits=limits) as client:
            for wave in waves:  # 50 at a time, leaving at random moments (queued, prefill, mid-stream)
                got = await asyncio.gather(*(leave(client, wave * 50 + j, rng.uniform(0.0, 1.5)) for j in range(50)))
                outcomes.update(got)
        return outcomes

    asyncio.run(run(range(4, 5)))  # a warm-up wave: the engines reach their working-set size first
    chaos.settled(timeout=5.0)
    rss0 = {name: rss_kib(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    outcomes = asyncio.run(run(range(4)))
    gone = time.monotonic()
    took = chaos.settled(timeout=5.0)
    rss1 = {name: rss_kib(pid) for name, pid in pids.items()}
    print(f"{N_DISCONNECTS} disconnects in {gone - t0:.1f} s ({dict(outcomes)}); every server idle with its "
          f"pool back {took:.2f} s after the last one; engine RSS KiB before {rss0} after {rss1}")
    for name in pids:
        assert rss1[name] < rss0[name] * 1.05, (name, rss0[name], rss1[name])
    assert outcomes["left"] >= N_DISCONNECTS // 2, outcomes
    # and the cluster still serves
    assert all(r.ok for r in chaos.calls(warm[:2], 2))
    chaos.settled()


# --- overload -----------------------------------------------------------------------------------------


def test_overload_burst_answers_only_200_408_429(chaos: Chaos) -> None:
    cfg = router_config(chaos.pair, [chaos.pair.decode, chaos.decode2],
                        limits=LimitsConfig(max_concurrent=4, queue_size=16, queue_timeout_s=3.0))
    with EmbeddedRouter(cfg) as small:
        wait_for(lambda: httpx.get(small.url + "/readiness").status_code == 200, 30, "the small router")

        async def burst() -> list[Reply]:
            limits = httpx.Limits(max_connections=320, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, headers=AUTH, limits=limits) as client:
                return await asyncio.gather(*(call(client, small.url, "/generate", gen(ids(16, 5000 + i), 2), False, 60)
                                              for i in range(300)))

        t0 = time.monotonic()
        replies = asyncio.run(burst())
        statuses = Counter(r.status for r in replies)
    print(f"300 requests at once, router queue 16: statuses {dict(statuses)} in {time.monotonic() - t0:.1f} s")
    assert set(statuses) <= {200, 408, 429}, statuses
    assert statuses[200] >= 4
    chaos.settled()


# --- SIGSTOP ------------------------------------------------------------------------------------------


def test_sigstop_a_decode(chaos: Chaos) -> None:
    """A decode frozen for 6 s (its health checks time out): requests end cleanly or are served."""
    victim = chaos.decode2
    items = [("/generate", gen(ids(40, 7000 + i), 16), i % 2 == 0) for i in range(12)]
    result: dict[str, Any] = {}

    def stop_and_continue() -> None:
        time.sleep(0.5)
        victim.proc.send_signal(signal.SIGSTOP)
        for pid in _group(victim):
            _signal(pid, signal.SIGSTOP)
        time.sleep(6.0)
        for pid in _group(victim):
            _signal(pid, signal.SIGCONT)
        victim.proc.send_signal(signal.SIGCONT)

    import threading

    t = threading.Thread(target=stop_and_continue)
    t0 = time.monotonic()
    t.start()
    replies = chaos.calls(items, 12, timeout=60)
    t.join()
    result["statuses"] = Counter(r.status for r in replies)
    ok = sum(r.ok for r in replies)
    print(f"SIGSTOP of a decode for 6 s: {ok}/{len(replies)} served, statuses {dict(result['statuses'])}, "
          f"all ended within {time.monotonic() - t0:.1f} s")
    for r in replies:
        assert r.status is not None, r.describe()  # none hung past the client timeout
        assert r.ok or r.error is not None, r.describe()
    wait_for(lambda: httpx.get(chaos.router.url + "/readiness").status_code == 200, 30, "router ready again")
    chaos.settled()


def _group(server: ServerProcess) -> list[int]:
    from tests.integration.conftest import children_of

    return sorted(children_of(server.proc.pid))


def _signal(pid: int, sig: signal.Signals) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- kill -9 the prefill: recompute -----------------------------------------------------------------

LONG = 700


def test_kill_prefill_mid_transfer_recomputes(chaos: Chaos) -> None:
    pair = chaos.pair
    bodies = [gen(ids(LONG, 8000 + i), 8) for i in range(4)]
    expected = reference(chaos.decode2, bodies)
    chaos.settled()
    port = pair.prefill.port
    items = [("/generate", b, i % 2 == 0) for i, b in enumerate(bodies)]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(chaos.calls, items, len(items), 120)
        wait_for(lambda: _load(pair.prefill)["num_running_reqs"] >= 1
                 and sum(_load(d)["used_pages"] for d in (pair.decode, chaos.decode2)) > 0, 60,
                 "a prompt mid-transfer")
        pair.kill_prefill()
        killed = time.monotonic()
        replies = fut.result(120)
    took = time.monotonic() - killed
    errors = [r.describe() for r in replies if not r.ok]
    print(f"kill -9 prefill mid-transfer: {len(replies) - len(errors)}/{len(replies)} completed by recompute, "
          f"{len(errors)} client errors, last answer {took:.1f} s after the kill")
    assert not errors, errors
    assert [output_ids(r) for r in replies] == expected  # greedy: nothing lost, equal to unified
    for d in (pair.decode, chaos.decode2):
        text = httpx.get(f"{d.url}/metrics", timeout=10).text
        assert "sglang:kv_transfer_recomputed_total" in text
    recomputed = sum(_metric(d, "sglang:kv_transfer_recomputed_total") for d in (pair.decode, chaos.decode2))
    assert recomputed >= 1, recomputed

    # the prefill comes back at its address, now failing 5% of its transfer sends
    pair.launch_prefill(env={"PDSERVE_DISAGGREGATION_FAIL_RATE": "0.05"}, port=port).wait_healthy()
    wait_for(lambda: httpx.get(chaos.router.url + "/readiness").status_code == 200, 30, "router ready again")
    chaos.mark()
    bodies = [gen(ids(random.Random(i).randint(8, 100), 9000 + i), 6) for i in range(50)]
    expected = reference(chaos.decode2, bodies)
    chaos.settled()
    before = sum(_metric(d, "sglang:kv_transfer_recomputed_total") for d in (pair.decode, chaos.decode2))
    replies = chaos.calls([("/generate", b, i % 2 == 0) for i, b in enumerate(bodies)], 50)
    errors = [r.describe() for r in replies if not r.ok]
    recomputed = sum(_metric(d, "sglang:kv_transfer_recomputed_total") for d in (pair.decode, chaos.decode2)) - before
    print(f"50 concurrent requests with 5% injected transfer failures: {len(errors)} client errors, "
          f"{recomputed:.0f} recomputed")
    assert not errors, errors
    assert [output_ids(r) for r in replies] == expected
    chaos.settled()
    # back to a prefill without injected failures for the tests after this one
    pair.kill_prefill()
    pair.launch_prefill(port=port).wait_healthy()
    wait_for(lambda: httpx.get(chaos.router.url + "/readiness").status_code == 200, 30, "router ready again")
    chaos.mark()


def _load(server: ServerProcess | None) -> dict[str, Any]:
    assert server is not None
    return httpx.get(f"{server.url}/get_load", headers=AUTH, timeout=10).json()


def _metric(server: ServerProcess | None, name: str) -> float:
    assert server is not None
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- kill -9 a decode under streams: migration -------------------------------------------------------

N_STREAMS = 32


def _stream_items(n: int, max_new: int) -> list[tuple[str, dict[str, Any], bool]]:
    items: list[tuple[str, dict[str, Any], bool]] = []
    for i in range(n):
        prompt = ids(random.Random(i).randint(20, 120), 11000 + i)
        if i % 3 == 0:
            items.append(("/generate", gen(prompt, max_new), True))
        elif i % 3 == 1:
            items.append(("/v1/completions", {"model": "default", "prompt": prompt, "max_tokens": max_new,
                                              "temperature": 0, "ignore_eos": True,
                                              "stream_options": {"include_usage": True}}, True))
        else:
            text = "Count the numbers: " + " ".join(str(t) for t in prompt[:30])
            items.append(("/v1/chat/completions", {"model": "default", "max_tokens": max_new, "temperature": 0,
                                                   "ignore_eos": True, "stream_options": {"include_usage": True},
                                                   "messages": [{"role": "user", "content": text}]}, True))
    return items


def stream_output(path: str, reply: Reply) -> tuple[Any, int | None]:
    """What a client got from a stream: (ids or text, completion tokens in the usage)."""
    if path == "/generate":
        final = reply.events[-1]
        return list(final["output_ids"]), final["meta_info"]["completion_tokens"]
    text, used = "", None
    roles = 0
    for ev in reply.events:
        for ch in ev.get("choices") or []:
            delta = ch.get("delta")
            if delta is not None:
                roles += "role" in delta
                text += delta.get("content") or ""
            else:
                text += ch.get("text") or ""
        if ev.get("usage"):
            used = ev["usage"]["completion_tokens"]
    if path == "/v1/chat/completions":
        assert roles == 1, reply.events[:3]  # one role delta, also across a migration
    assert len({(ev.get("id"), ev.get("created")) for ev in reply.events}) == 1  # one response, one id
    return text, used


def test_kill_decode_under_streams_they_migrate(chaos: Chaos) -> None:
    pair = chaos.pair
    items = _stream_items(N_STREAMS, 40)
    baseline = chaos.calls(items, N_STREAMS)
    assert all(r.ok and r.done for r in baseline), [r.describe() for r in baseline if not r.ok][:2]
    expected = [stream_output(path, r) for (path, _, _), r in zip(items, baseline)]
    chaos.settled()
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(chaos.calls, items, N_STREAMS, 90)
        wait_for(lambda: _load(pair.decode)["num_running_reqs"] >= 4, 60, "streams running on the decode")
        time.sleep(1.0)
        pair.kill_decode()
        killed = time.monotonic()
        replies = fut.result(120)
    took = time.monotonic() - killed
    completed = [r.ok and r.done for r in replies]
    equal = [stream_output(path, r) == want for (path, _, _), r, want, ok in zip(items, replies, expected, completed)
             if ok]
    moved = httpx.get(chaos.router.url + "/metrics").text
    print(f"kill -9 a decode under {N_STREAMS} streams: {sum(completed)} completed ({sum(equal)} equal to the "
          f"no-fault run), {N_STREAMS - sum(completed)} failed; last ended {took:.1f} s after the kill; "
          + " ".join(line for line in moved.splitlines() if line.startswith("sgl_router_migrations_total")))
    assert sum(completed) >= 0.95 * N_STREAMS, [r.describe() for r in replies if not r.ok][:3]
    assert all(equal), [(i, stream_output(p, r), w) for i, ((p, _, _), r, w) in enumerate(zip(items, replies, expected))
                        if r.ok and stream_output(p, r) != w][:2]
    for r in replies:
        if not (r.ok and r.done):
            assert r.error is not None and r.elapsed < 30 + took, r.describe()
    for name in ("prefill", "decode2"):  # pools back at start on the survivors
        from tests.chaos.cluster import wait_settled_keyed
        wait_settled_keyed(chaos.servers[name].url, chaos.marks[name], 30)
    port = pair.decode.port
    pair.launch_decode(port=port).wait_healthy()
    wait_for(lambda: chaos.router.app.registry.get(pair.decode.url).routable(), 10, "the decode back")
    chaos.mark()


# --- restart and engine death -----------------------------------------------------------------------


def test_restarted_decode_serves_within_5_s_of_healthy(chaos: Chaos) -> None:
    pair = chaos.pair
    port = pair.decode.port
    pair.kill_decode()
    items = [("/generate", gen(ids(20, 9500 + i), 2), False) for i in range(6)]
    assert all(r.ok for r in chaos.calls(items, 3))  # the other decode serves meanwhile
    pair.launch_decode(port=port).wait_healthy()
    healthy_at = time.monotonic()
    router_worker = chaos.router.app.registry.get(pair.decode.url)

    def served() -> bool:
        before = router_worker.processed
        chaos.calls(items[:2], 2)
        return router_worker.processed > before

    wait_for(served, 5.0, "the restarted decode to get traffic", interval=0.1)
    took = time.monotonic() - healthy_at
    print(f"a decode restarted at its address served again {took:.2f} s after answering /health")
    assert took < 5.0
    chaos.mark()
    chaos.settled()


def test_engine_death_gives_503_and_the_front_exits(chaos: Chaos) -> None:
    """Last: it takes decode2 down for good."""
    victim = chaos.decode2
    pid = engine_pid(victim)
    body = gen(ids(30, 9900), 400)

    async def during() -> tuple[Reply, Reply]:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
            streaming = asyncio.create_task(call(client, victim.url, "/generate", body, True, 30))
            await asyncio.sleep(1.0)
            _signal(pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            new = await call(client, victim.url, "/generate", gen(ids(10, 9901), 2), False, 10)
            return await streaming, new

    t0 = time.monotonic()
    streamed, new = asyncio.run(during())
    code = victim.proc.wait(10)
    took = time.monotonic() - t0 - 1.0
    print(f"engine killed: in-flight stream {streamed.status} {streamed.error}, new request {new.status}, "
          f"front exit code {code} {took:.1f} s after the kill")
    assert streamed.error is not None and streamed.error.get("code") in ("engine_unavailable", 503, "503"), \
        streamed.describe()
    assert new.status in (503, None), new.describe()  # 503 while it shuts down, or already gone
    assert code != 0 and took < 5.0, (code, took)
