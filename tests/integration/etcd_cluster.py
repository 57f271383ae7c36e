"""What the real-etcd cluster tests share (test_discovery_cluster.py, test_elastic_cluster.py): the
server flags, the prompts and the greedy outputs they are compared on, and looks at etcd and routers.

    args = server_args("decode", etcd.url, ttl=10, bootstrap=True)   # --discovery ...; a bootstrap port
    outputs(url)          # greedy completions + one chat of PROMPTS through any server or router
    discovered(url)       # a router's GET /workers
    records(etcd.url)     # {url: WorkerRecord} registered in etcd now
"""

from __future__ import annotations

from typing import Any

import httpx

from pdserve.contract import WorkerRecord, decode_record
from pdserve.discovery import parse_discovery_url
from pdserve.discovery.store import EtcdStore
from tests.integration.conftest import free_port

ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "1024", "--num-pages", "400", "--page-size", "16",
        "--chunk-budget", "64", "--seed", "0", "--max-tokens-cap", "256"]
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
N = 8


def server_args(role: str, etcd_url: str, ttl: int, bootstrap: bool = False, events: bool = False) -> list[str]:
    """A PD server that registers in etcd; `bootstrap`: a bootstrap port (a prefill, or a decode that may
    switch to prefill); `events`: it publishes KV events on a free port."""
    args = [*ARGS, "--disaggregation-mode", role, "--discovery", etcd_url, "--discovery-ttl", str(ttl)]
    if bootstrap or role == "prefill":
        args += ["--disaggregation-bootstrap-port", str(free_port())]
    if events:
        args += ["--kv-events-config", "{}"]
    return args


def completion(client: httpx.Client, base: str, prompt: str, max_tokens: int = N) -> httpx.Response:
    return client.post(base + "/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0})


def outputs(base: str) -> list[Any]:
    out: list[Any] = []
    with httpx.Client(timeout=120) as client:
        for prompt in PROMPTS:
            r = completion(client, base, prompt)
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["text"])
        msgs = [{"role": "user", "content": PROMPTS[1]}]
        r = client.post(base + "/v1/chat/completions", json={"model": "default", "messages": msgs, "max_tokens": N,
                                                              "temperature": 0})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


def discovered(url: str) -> dict[str, Any]:
    return httpx.get(url + "/workers", timeout=5).json()


def records(etcd_url: str) -> dict[str, WorkerRecord]:
    cfg = parse_discovery_url(etcd_url)
    return {r.url: r for r in map(decode_record, EtcdStore(cfg).list(cfg.workers_prefix).values())}
