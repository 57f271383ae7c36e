"""Tensor parallelism across two hosts for real: a second network namespace joined to this one
by a veth pair with addresses of its own acts as node 1 (`--nnodes 2 --node-rank 1`); node 0
serves HTTP. The ranks rendezvous at node 0's veth address and their collectives cross the veth.
Skips (saying why) where namespaces cannot be created; removes them at the end."""

from __future__ import annotations

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
from pdserve.launch.procs import kill_group
from tests.integration.conftest import ROOT, ServerProcess, free_port

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


def test_tp2_over_two_hosts_equals_tp1(two_hosts: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(4, 40))] for _ in range(4)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(str(tiny_model_dir), num_pages=128, page_size=4, threads=1) as llm:
        want = [o.output_ids for o in llm.generate(prompts, params, use_tqdm=False)]
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
