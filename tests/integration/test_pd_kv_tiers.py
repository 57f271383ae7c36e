"""KV tiers under PD, at the engine level: prefill and decode Engines in this process over a real
transfer backend (tcp, shm, nixl), both with host tiers and one shared store (a directory, or a
real mooncake_master with a store holder), tiny model. What must hold (issue 25):

  - greedy output of multi-turn conversations with every write policy on, device pools small
    enough to evict mid-run, equals a unified engine without tiers; every tier's accounting
    (`free + cached + in use == total`, host slots too) holds after every step;
  - a decode writes finished requests back: a second prefill serving turn 2 of a conversation
    whose turn 1 ran on the first (now gone) reads turn 1's prompt and reply from the store and
    computes only the new message (token and byte counters);
  - a stream migrated off a dead decode, and a request whose transfer failed (recomputed), load
    their prefix from the store (counters), output equal to no fault;
  - the master killed mid-run costs no request (one outage, storage down); it coming back is
    picked up (writes and reads resume).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig, HiCacheConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import Bootstrap, GenerateReq, TokenOut
from pdserve.engine.sampling_params import SamplingParams
from tests.integration.test_pd_engines import engine_cfg, tokens
from tests.mooncake_master import MooncakeMaster, free_port

PS = 4
NEW = 6
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


def tiered(folder: Path, store: str, extra: dict[str, object], num_pages: int = 200, **hicache: object) -> EngineConfig:
    h = HiCacheConfig(enable=True, ratio=1.0, storage_backend=store, storage_extra=json.dumps(extra),
                      prefetch_policy="wait_complete", **hicache)  # type: ignore[arg-type]
    return replace(engine_cfg(folder, num_pages=num_pages), hicache=h)


def disagg(mode: str, backend: str = "tcp") -> DisaggConfig:
    return DisaggConfig(mode=mode, backend=backend, bootstrap_port=0, heartbeat_interval=0.5)


def step_all(engines: list[Engine], rids: set[str], timeout: float = 90.0,
             until: int | None = None) -> dict[str, list[TokenOut]]:
    """Step every engine (integrity checked after each step) until `rids` finished (or, `until`,
    until that many tokens of them came out)."""
    outs: dict[str, list[TokenOut]] = {}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while done != rids:
        assert time.monotonic() < deadline, f"stuck: {rids - done}"
        for e in engines:
            for o in e.step():
                outs.setdefault(o.rid, []).append(o)
                assert o.error is None, o.error
                if o.finished:
                    done.add(o.rid)
            e.check_integrity()  # device and host: free + cached + in use == total
        if until is not None and sum(len(tokens(outs.get(r, []))) for r in rids) >= until:
            break
        time.sleep(0.001)
    return outs


def pd_turn(pre: Engine, dec: Engine, rid: str, prompt: list[int], room: int,
            params: SamplingParams = PARAMS) -> list[int]:
    boot = Bootstrap("127.0.0.1", pre.stage.bootstrap_server.port, room=room)
    pre.add_request(GenerateReq(f"p{rid}", prompt, params, bootstrap=boot))
    dec.add_request(GenerateReq(f"d{rid}", prompt, params, bootstrap=boot))
    return tokens(step_all([pre, dec], {f"p{rid}", f"d{rid}"})[f"d{rid}"])


def answer(uni: Engine, rid: str, prompt: list[int], params: SamplingParams = PARAMS) -> list[int]:
    uni.add_request(GenerateReq(rid, prompt, params))
    return tokens(step_all([uni], {rid})[rid])


def storage(e: Engine) -> dict[str, int]:
    t = e.load().tiers
    assert t is not None
    return {"read": t.storage_pages_read, "read_bytes": t.storage_bytes_read, "written": t.storage_pages_written,
            "outages": t.storage_outages, "up": int(t.storage_up), "hit_storage": t.hit_tokens["storage"]}


@pytest.fixture(scope="module")
def unified(tiny_model_dir: Path) -> Engine:
    return Engine.build(engine_cfg(tiny_model_dir))


@pytest.mark.parametrize("backend,policy", [("tcp", "write_through"), ("shm", "write_back"),
                                            ("nixl", "write_through_selective")])
def test_multi_turn_with_tiers_on_small_pools_equals_unified(backend: str, policy: str, tiny_model_dir: Path,
                                                             tmp_path: Path, unified: Engine) -> None:
    extra = {"path": str(tmp_path / "store")}
    pre = Engine.build(tiered(tiny_model_dir, "file", extra, num_pages=26, write_policy=policy),
                       disagg("prefill", backend))
    dec = Engine.build(tiered(tiny_model_dir, "file", extra, num_pages=30, write_policy=policy),
                       disagg("decode", backend))
    try:
        rng = random.Random(5)
        system = [rng.randrange(3, 49000) for _ in range(30)]
        chats = [list(system) for _ in range(3)]
        room = 0
        for t in range(3):  # three turns of three chats, interleaved: 26 / 30 pages cannot hold them
            for c, history in enumerate(chats):
                prompt = history + [rng.randrange(3, 49000) for _ in range(rng.randint(4, 11))]
                ref = answer(unified, f"u{t}{c}{backend}", prompt)
                room += 1
                assert pd_turn(pre, dec, f"{t}{c}", prompt, room) == ref
                chats[c] = prompt + ref
        for e in (pre, dec):
            e.kv.flush()
            e.check_integrity()
            t_load = e.load().tiers
            assert t_load is not None and t_load.host_pages_written > 0
        prefill = pre.load().tiers
        assert prefill is not None and prefill.hit_tokens["device"] + prefill.hit_tokens["host"] \
            + prefill.hit_tokens["storage"] > 0  # later turns found earlier ones in some tier
        assert storage(dec)["written"] > 0  # the decode wrote its finished requests back
    finally:
        pre.close()
        dec.close()


@pytest.fixture
def mooncake_store(tmp_path: Path):
    """A real mooncake_master and a store holder (Mooncake's store service, as `pdserve launch`
    runs it): the pages live in the holder's segment, so they outlive the engines."""
    master = MooncakeMaster.start()
    cfg = {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE", "global_segment_size": "64mb",
           "local_buffer_size": "16mb", "protocol": "tcp", "device_name": "", "master_server_address": master.address}
    (tmp_path / "holder.json").write_text(json.dumps(cfg))
    rest = free_port()
    holder = subprocess.Popen([sys.executable, "-m", "mooncake.mooncake_store_service", "--config",
                               str(tmp_path / "holder.json"), "--port", str(rest)],
                              stdout=open(tmp_path / "holder.log", "wb"), stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{rest}/api/exist/x", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert holder.poll() is None and time.monotonic() < deadline, (tmp_path / "holder.log").read_text()
            time.sleep(0.2)
        yield master, {"master_server_address": master.address, "local_hostname": "127.0.0.1",
                       "global_segment_size": 0, "local_buffer_size": "16mb"}
    finally:
        holder.terminate()
        try:
            holder.wait(20)
        except subprocess.TimeoutExpired:
            holder.kill()
        master.stop()


def test_a_second_prefill_reads_turn_one_from_mooncake_and_a_dead_master_costs_nothing(
        tiny_model_dir: Path, mooncake_store, unified: Engine) -> None:
    master, extra = mooncake_store
    pre_a = Engine.build(tiered(tiny_model_dir, "mooncake", extra), disagg("prefill"))
    dec = Engine.build(tiered(tiny_model_dir, "mooncake", extra, write_policy="write_back"), disagg("decode"))
    pre_b = None
    try:
        rng = random.Random(9)
        prompt1 = [rng.randrange(3, 49000) for _ in range(41)]
        reply1 = pd_turn(pre_a, dec, "t1", prompt1, 1)
        assert reply1 == answer(unified, "m1", prompt1)
        dec.kv.flush()  # (within a second of the request's end, idle or not: the engine process polls)
        written = storage(dec)["written"]
        assert written == (len(prompt1) + NEW - 1) // PS  # prompt and reply, every full page it computed
        pre_a.close()  # turn 1's prefill is gone: only the store (the holder's segment) remembers it
        pre_b = Engine.build(tiered(tiny_model_dir, "mooncake", extra), disagg("prefill"))
        new = [rng.randrange(3, 49000) for _ in range(7)]
        prompt2 = prompt1 + reply1 + new
        computed = pre_b.stats.prompt_tokens
        reply2 = pd_turn(pre_b, dec, "t2", prompt2, 2)
        assert reply2 == answer(unified, "m2", prompt2)
        hit = written * PS  # turn 1's prompt and reply, whole pages, from the store
        got = storage(pre_b)
        assert got["read"] == written and got["read_bytes"] >= written * pre_b.pool.page_bytes()
        assert pre_b.stats.prompt_tokens - computed == len(prompt2) - hit  # only the new message (+ a page)
        assert got["hit_storage"] == hit

        master.kill()  # mid-run: the next turn computes what the store would have given, nothing fails
        prompt3 = prompt2 + reply2 + [rng.randrange(3, 49000) for _ in range(5)]
        t0 = time.monotonic()
        assert pd_turn(pre_b, dec, "t3", prompt3, 3) == answer(unified, "m3", prompt3)
        assert time.monotonic() - t0 < 30
        for e in (pre_b, dec):
            e.kv.flush()
        assert storage(dec)["outages"] == 1 and not storage(dec)["up"]

        master.restart()  # it comes back (empty: the old index is gone); the holder mounts again
        time.sleep(3.0)  # the holder's segment, and the breakers' retry
        before = storage(dec)["written"]
        prompt4 = [rng.randrange(3, 49000) for _ in range(23)]
        assert pd_turn(pre_b, dec, "t4", prompt4, 4) == answer(unified, "m4", prompt4)
        dec.kv.flush()
        assert storage(dec)["up"] and storage(dec)["written"] > before  # writes resume
    finally:
        for e in (pre_a, pre_b, dec):
            if e is not None:
                e.close()


def test_migrated_stream_and_recomputed_request_load_their_prefix_from_the_store(
        tiny_model_dir: Path, tmp_path: Path, unified: Engine) -> None:
    extra = {"path": str(tmp_path / "store")}
    long = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    pre = Engine.build(tiered(tiny_model_dir, "file", extra), disagg("prefill"))
    dec1 = Engine.build(tiered(tiny_model_dir, "file", extra), disagg("decode"))
    dec2 = Engine.build(tiered(tiny_model_dir, "file", extra), disagg("decode"))
    try:
        rng = random.Random(11)
        prompt = [rng.randrange(3, 49000) for _ in range(37)]
        ref = answer(unified, "mig", prompt, long)
        boot = Bootstrap("127.0.0.1", pre.stage.bootstrap_server.port, room=21)
        pre.add_request(GenerateReq("p", prompt, long, bootstrap=boot))
        dec1.add_request(GenerateReq("d", prompt, long, bootstrap=boot))
        got = step_all([pre, dec1], {"d"}, until=17)  # 17 tokens reached the client ...
        delivered = tokens(got["d"])
        dec1.kv.flush()  # (pages it completed a moment ago are in the store; later ones would be lost)
        dec1.close()  # ... then the decode died
        assert storage(dec1)["written"] == (len(prompt) + len(delivered) - 1) // PS  # each page as it completed
        # the router re-sends the stream to another decode with the delivered ids (router/migrate.py)
        computed = dec2.stats.prompt_tokens
        dec2.add_request(GenerateReq("m", prompt, long, output_ids=delivered))
        rest = tokens(step_all([dec2], {"m"})["m"])
        assert delivered + rest == ref  # the same stream as with no fault
        fetched = storage(dec2)["read"]
        assert fetched == (len(prompt) + len(delivered) - 1) // PS
        assert dec2.stats.prompt_tokens - computed == len(prompt) + len(delivered) - fetched * PS

        # a request whose KV transfer fails (its prefill is unreachable) is recomputed: from the store
        dec2.kv.flush()
        assert dec2.flush_cache()  # (its own tiers forget the stream: only the store holds it)
        prompt2 = prompt + ref + [rng.randrange(3, 49000) for _ in range(6)]
        dead = Bootstrap("127.0.0.1", free_port(), room=22)
        dec2.stage.client.fetch_timeout = 1.0  # (30 s by default: a prefill may still be starting)
        before, computed = storage(dec2)["read"], dec2.stats.prompt_tokens
        dec2.add_request(GenerateReq("r", prompt2, PARAMS, bootstrap=dead))
        assert tokens(step_all([dec2], {"r"})["r"]) == answer(unified, "rec", prompt2)
        assert dec2.load().transfer is not None and dec2.load().transfer.recomputed == 1
        assert storage(dec2)["read"] > before  # its prefix came from the store (dec1 wrote it all back)
        assert dec2.stats.prompt_tokens - computed < len(prompt2) - len(prompt)
        for e in (pre, dec2):
            e.kv.flush()
            e.check_integrity()
    finally:
        for e in (pre, dec1, dec2):
            e.close()
