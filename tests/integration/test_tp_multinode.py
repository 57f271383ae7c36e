"""Two hosts for real: a second network namespace joined to this one by a veth pair with
addresses of its own acts as the second host. Skips (saying why) where namespaces cannot be
created; removes them at the end.

- Tensor parallelism across the hosts: node 1 (`--nnodes 2 --node-rank 1`) in the namespace,
  node 0 serving HTTP here; the ranks rendezvous at node 0's veth address and their collectives
  cross the veth.
- PD across the hosts: a tp-2 prefill in the namespace, a decode here. The prefill's ranks
  register transfer endpoints at its veth address with its bootstrap server, the decode dials
  them, and the KV crosses the veth; output equals one unified engine's.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.flags.procs import kill_group
from tests.integration.conftest import ROOT, ServerProcess, free_port
from tests.integration.pd_cluster import call, wait_settled

NS, VETH_A, VETH_B = "pdserve-tp-b", "pdtp-a0", "pdtp-b0"
HOST_A, HOST_B = "10.231.7.1", "10.231.7.2"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=check)


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    _ip("netns", "del", NS, check=False)
    _ip("link", "del", VETH_A, check=False)
    made = _ip("netns", "add", NS, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        _ip("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
        _ip("link", "set", VETH_B, "netns", NS)
        _ip("addr", "add", f"{HOST_A}/24", "dev", VETH_A)
        _ip("link", "set", VETH_A, "up")
        _ip("addr", "add", f"{HOST_B}/24", "dev", VETH_B, ns=NS)
        _ip("link", "set", VETH_B, "up", ns=NS)
        _ip("link", "set", "lo", "up", ns=NS)
        yield
    finally:
        _ip("netns", "del", NS, check=False)  # takes the veth pair with it
        _ip("link", "del", VETH_A, check=False)


def _reference(model: Path, seed: int, count: int, longest: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts and one unified tp-1 engine's greedy 8 tokens for each."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(4, longest))] for _ in range(count)]
    with LLM(str(model), num_pages=128, page_size=4, threads=1) as llm:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    return prompts, [o.output_ids for o in outs]


def test_tp2_over_two_hosts_equals_tp1(two_hosts: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts, want = _reference(tiny_model_dir, seed=11, count=4, longest=40)
    addr = f"{HOST_A}:{free_port()}"
    common = ["--model", str(tiny_model_dir), "--num-pages", "128", "--page-size", "4", "--threads", "1",
              "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    node0 = ServerProcess([*common, "--node-rank", "0"], tmp_path / "node0.log")
    log1 = open(tmp_path / "node1.log", "wb")
    node1 = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "pdserve.cli", "serve", *common,
                              "--node-rank", "1"], cwd=ROOT, stdout=log1, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        node0.wait_healthy(timeout=240)
        for prompt, ids in zip(prompts, want):
            r = httpx.post(f"{node0.url}/generate", json={"input_ids": prompt, "sampling_params": {
                "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == ids
        # node 1's ranks talk to node 0 over the veth: their TCP peers are HOST_A's address
        conns = subprocess.run(["ip", "netns", "exec", NS, "ss", "-tnH", "state", "established"],
                               capture_output=True, text=True, timeout=10).stdout
        assert f"{HOST_B}:" in conns and f"{HOST_A}:" in conns, conns
        assert node1.poll() is None
        assert node0.stop() == 0
        node1.wait(timeout=30)  # rank 0 said StopRanks: node 1 ends cleanly
        assert node1.returncode == 0, (tmp_path / "node1.log").read_text()[-2000:]
    finally:
        node0.stop()
        if node1.poll() is None:
            kill_group(node1)
        log1.close()
        time.sleep(0.2)


def _established(ns: str | None = None) -> str:
    cmd = ["ss", "-tnH", "state", "established"]
    return subprocess.run(["ip", "netns", "exec", ns, *cmd] if ns else cmd, capture_output=True, text=True,
                          timeout=10).stdout


def test_pd_across_two_hosts_equals_unified(two_hosts: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts, want = _reference(tiny_model_dir, seed=12, count=6, longest=60)
    common = ["--model", str(tiny_model_dir), "--num-pages", "128", "--page-size", "4", "--threads", "1",
              "--disaggregation-transfer-backend", "tcp"]
    boot_port = free_port()
    prefill = ServerProcess([*common, "--disaggregation-mode", "prefill", "--tp-size", "2",
                             "--disaggregation-bootstrap-port", str(boot_port)], tmp_path / "prefill.log",
                            host=HOST_B, prefix=["ip", "netns", "exec", NS])
    decode = ServerProcess([*common, "--disaggregation-mode", "decode"], tmp_path / "decode.log", host=HOST_A)
    try:
        prefill.wait_healthy(timeout=240)
        decode.wait_healthy(timeout=240)
        marks = {s.url: (lambda load: load["free_pages"] + load["cached_pages"])(
            httpx.get(f"{s.url}/get_load", timeout=10).json()) for s in (prefill, decode)}

        async def pd(i: int, prompt: list[int]) -> tuple:
            body = {"input_ids": prompt, "bootstrap_host": HOST_B, "bootstrap_port": boot_port,
                    "bootstrap_room": 9100 + i,
                    "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(call(client, prefill.url, "/generate", body, False, 60),
                                            call(client, decode.url, "/generate", body, False, 60))

        async def all_pd() -> list[tuple]:
            return await asyncio.gather(*(pd(i, p) for i, p in enumerate(prompts)))

        for (pre, dec), ids in zip(asyncio.run(all_pd()), want):
            assert pre.ok and dec.ok, (pre.describe(), dec.describe(), decode.log_tail())
            assert dec.json["output_ids"] == ids
        # every room's KV moved (the namespaces share no loopback: it crossed the veth) ...
        metrics = httpx.get(f"{decode.url}/metrics", timeout=10).text
        assert any(line.startswith("sglang:kv_transfers_total") and 'result="success"' in line
                   and float(line.split()[-1]) == len(prompts) for line in metrics.splitlines()), metrics
        # ... on sessions between the two hosts' addresses
        conns = _established()
        assert f"{HOST_A}:" in conns and f"{HOST_B}:" in conns, conns
        for server in (prefill, decode):
            wait_settled(server.url, marks[server.url])
    finally:
        decode.stop()
        prefill.stop()
        time.sleep(0.2)
