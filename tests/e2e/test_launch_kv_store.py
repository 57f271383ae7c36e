"""`pdserve launch --hicache-storage-backend mooncake`: one command runs a mooncake_master, a store
holder, a prefill, a decode and a cache_aware router (tiny model, API key), and stops them all.

Through the router, a two-turn conversation: the decode writes turn 1's pages back (prompt and
reply), so turn 2's prefill finds the reply in the store (its storage hit tokens, /metrics);
the router's index knows the pages any worker of that store can fetch; /get_load shows each
tier; /hicache/storage-backend (API key) detaches and attaches the store at run time and
/server_info says which store a worker uses. SIGTERM stops the master and the holder too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, free_port, pid_alive

KEY = "kv-store-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def generate(url: str, ids: list[int], n: int) -> list[int]:
    r = httpx.post(url + "/generate", headers=AUTH, timeout=120, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_launch_runs_a_shared_mooncake_store_for_pd(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    server_args = ("--num-pages 64 --page-size 4 --skip-server-warmup --hicache-storage-prefetch-policy "
                   "wait_complete --max-model-len 200")
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.launch", "--model", str(tiny_model_dir), "--port",
                             str(port), "--log-dir", str(tmp_path), "--api-key", KEY, "--start-timeout", "300",
                             "--hicache-storage-backend", "mooncake", "--hicache-store-gb", "0.25", "--server-args",
                             server_args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("pdserve is ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 330
        while not ready.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.is_set(), "".join(lines)[-3000:]
        pids = {ln.split()[0]: int(ln.split()[2].rstrip(",")) for ln in lines if ln.startswith("  ") and " pid " in ln}
        assert {"mooncake-master", "kv-store-holder"} <= set(pids)
        workers = {w["role"]: w["url"] for w in
                   httpx.get(url + "/workers", headers=AUTH, timeout=10).json()["workers"]}
        prefill, decode = workers["prefill"], workers["decode"]
        info = httpx.get(prefill + "/server_info", headers=AUTH, timeout=10).json()
        assert info["hicache_storage"].startswith("mooncake:127.0.0.1:")

        turn1 = list(range(100, 141))
        reply = generate(url, turn1, 12)
        time.sleep(1.0)  # the decode's write-back is visible within a second of the request's end
        turn2 = turn1 + reply + list(range(300, 307))
        generate(url, turn2, 4)
        tiers = httpx.get(prefill + "/get_load", headers=AUTH, timeout=10).json()["kv_tiers"]
        assert tiers["hit_tokens"]["storage"] >= 8  # the reply's pages came from the store
        assert {"device", "host", "storage"} <= set(tiers) and tiers["storage"]["backend"] == "mooncake"
        assert metric(prefill, "sglang:hicache_hit_tokens_total", tier="storage") == tiers["hit_tokens"]["storage"]
        written = httpx.get(decode + "/get_load", headers=AUTH, timeout=10).json()["kv_tiers"]["storage"]
        assert written["pages_written"] >= (len(turn1) + 11) // 4
        index = httpx.get(url + "/kv_index", headers=AUTH, timeout=10).json()
        assert any((w.get("store_blocks") or 0) > 0 for w in index.values())

        path = "/hicache/storage-backend"
        assert httpx.get(prefill + path, timeout=10).status_code == 401  # the API key guards it
        assert httpx.delete(prefill + path, headers=AUTH, timeout=30).json()["hicache_storage_backend"] is None
        assert httpx.get(prefill + "/server_info", headers=AUTH, timeout=10).json()["hicache_storage"] is None
        extra = info["engine"]["hicache"]["storage_extra"]
        body = {"hicache_storage_backend": "mooncake", "hicache_storage_backend_extra_config_json": extra}
        r = httpx.put(prefill + path, headers=AUTH, json=body, timeout=60)
        assert r.status_code == 200 and r.json()["hicache_storage_backend"] == "mooncake", r.text
        bad = httpx.put(prefill + path, headers=AUTH, json={**body, "hicache_storage_backend": "s3"}, timeout=10)
        assert bad.status_code == 400
        assert generate(url, turn2, 4)  # still serving
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    time.sleep(0.5)
    assert not any(pid_alive(p) for p in pids.values()), "a child outlived the launch"
    assert json.loads((tmp_path / "mooncake-holder.json").read_text())["global_segment_size"] == 1 << 28
