"""Two-process transfer harness: prefill and decode agents in spawned processes, driven by
msgpack commands over a pipe (bytes only; nothing pickled but the spawn handshake itself).
Used by tests/integration/test_transfer_*.py and benchmarks/kv_transfer.py; it is test and
benchmark tooling, so it lives here and not in the pdserve package (the benchmark puts the repo
root on sys.path to import it).

Lifecycle:
    agent = Agent(AgentSpec(role="prefill", backends=["tcp", "shm"]))   # spawn ('spawn' context)
    agent.wait_ready()        # the child built its pool, managers (and bootstrap server) and said so
    agent.call("sender", backend="tcp", room=7) ...                     # one command at a time
    agent.close()             # "exit", bounded join, then SIGKILL;  agent.kill() = kill -9 now

An agent holds one KV pool (random, seeded; a decode agent's pool is in shared memory so every
backend, shm included, can use it) and one manager per backend on that pool. A prefill agent also
runs a bootstrap server on a free port where backend i is registered as rank i. The agent dies
with its parent (PR_SET_PDEATHSIG, and EOF on the pipe).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import msgspec

AGENT_CMD_TIMEOUT = 30.0


class AgentSpec(msgspec.Struct, frozen=True):
    role: str  # prefill | decode
    backends: list[str]
    num_layers: int = 2
    kv_heads: int = 2
    head_dim: int = 16
    page_size: int = 4
    num_pages: int = 64
    dtype: str = "float32"
    model: str = "tiny"
    seed: int = 0
    config: dict[str, Any] = {}  # DisaggConfig overrides
    torch_threads: int = 1


class AgentError(RuntimeError):
    pass


class Agent:
    """Parent-side handle of one agent process."""

    def __init__(self, spec: AgentSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=agent_main, args=(child, msgspec.msgpack.encode(spec)), daemon=True,
                                name=f"pd-agent-{spec.role}")
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        self.info = self._reply(timeout)
        return self.info

    def call(self, op: str, timeout: float = AGENT_CMD_TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        self._conn.send_bytes(msgspec.msgpack.encode({"op": op, **kwargs}))
        return self._reply(timeout)

    def _reply(self, timeout: float) -> dict[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.spec.role} agent gave no answer within {timeout} s")
        reply = msgspec.msgpack.decode(self._conn.recv_bytes())
        if not reply.get("ok"):
            raise AgentError(reply.get("error", "unknown agent error"))
        return reply

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=timeout)
            except (AgentError, TimeoutError, OSError, EOFError):
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
        self._conn.close()


def close_all(agents: list[Agent], timeout: float = 10.0) -> None:
    """Close several agents at once (their shutdowns overlap); kill what does not exit."""
    asked = []
    for agent in agents:
        if agent.proc.is_alive():
            try:
                agent._conn.send_bytes(msgspec.msgpack.encode({"op": "exit"}))
                asked.append(agent)
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    for agent in asked:
        agent.proc.join(max(0.1, deadline - time.monotonic()))
    for agent in agents:
        if agent.proc.is_alive():
            agent.kill()
        agent._conn.close()


# --- child side ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def agent_main(conn: Any, spec_bytes: bytes) -> None:
    _die_with_parent()
    spec = msgspec.msgpack.decode(spec_bytes, type=AgentSpec)
    try:
        state = _AgentState(spec)
    except Exception as exc:  # report, then exit
        conn.send_bytes(msgspec.msgpack.encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return
    conn.send_bytes(msgspec.msgpack.encode({"ok": True, **state.describe()}))
    while True:
        try:
            cmd = msgspec.msgpack.decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        op = cmd.pop("op")
        try:
            reply = {"ok": True, **(getattr(state, "op_" + op)(**cmd) or {})}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        conn.send_bytes(msgspec.msgpack.encode(reply))
        if op == "exit":
            break
    state.shutdown()


class _AgentState:
    def __init__(self, spec: AgentSpec) -> None:
        import torch

        from pdserve.disagg.config import DisaggConfig
        from pdserve.disagg.messages import KVLayout

        torch.set_num_threads(max(1, spec.torch_threads))
        self.spec = spec
        dtype = getattr(torch, spec.dtype)
        shape = (spec.num_layers, spec.num_pages * spec.page_size, spec.kv_heads, spec.head_dim)
        gen = torch.Generator().manual_seed(spec.seed)
        self.shared = None
        if spec.role == "decode":
            from pdserve.disagg.transfer.backends.shm_pool import allocate_shared_pool

            self.shared = allocate_shared_pool(shape, dtype)
            self.k, self.v = self.shared.k, self.shared.v
            self.k.copy_(torch.randn(shape, generator=gen).to(dtype))
            self.v.copy_(torch.randn(shape, generator=gen).to(dtype))
        else:
            self.k = torch.randn(shape, generator=gen).to(dtype)
            self.v = torch.randn(shape, generator=gen).to(dtype)
        self.layout = KVLayout.for_pool(spec.model, self.k, spec.page_size)
        self.config = DisaggConfig.from_env(mode=spec.role, bootstrap_port=0, **spec.config)
        self.managers: dict[str, Any] = {}
        self.rooms: dict[int, Any] = {}
        self.server = None
        self.client = None
        for name in spec.backends:
            self.op_manager(name, name, {})
        if spec.role == "prefill":
            from pdserve.disagg.bootstrap import BootstrapServer

            self.server = BootstrapServer("127.0.0.1", 0, self.config.cluster_token).start()
            for rank, name in enumerate(spec.backends):
                self.server.register(rank, self.managers[name].endpoint, self.layout)
        else:
            from pdserve.disagg.bootstrap_client import BootstrapClient

            self.client = BootstrapClient(self.layout, self.config, fetch_timeout=10.0)
            for mgr in self.managers.values():
                mgr.watch(self.client)

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "endpoints": {n: m.endpoint for n, m in self.managers.items()},
                "bootstrap_port": self.server.port if self.server is not None else None,
                "shm_path": self.shared.path if self.shared is not None else None}

    def shutdown(self) -> None:
        for mgr in self.managers.values():
            mgr.close()
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()
        if self.shared is not None:
            self.shared.close()

    # --- managers and rooms -------------------------------------------------------------------

    def op_manager(self, name: str, backend: str, overrides: dict[str, Any]) -> dict[str, Any]:
        import dataclasses

        from pdserve.disagg.transfer import create_manager

        config = dataclasses.replace(self.config, backend=backend, **overrides)
        mgr = create_manager(backend, self.spec.role, self.k, self.v, self.spec.page_size, self.layout, config)
        self.managers[name] = mgr
        if self.client is not None:
            mgr.watch(self.client)
        return {"endpoint": mgr.endpoint}

    def op_info(self) -> dict[str, Any]:
        return self.describe()

    def op_sender(self, backend: str, room: int) -> None:
        self.rooms[room] = self.managers[backend].sender(room)

    def op_receiver(self, backend: str, room: int, endpoint: str) -> None:
        self.rooms[room] = self.managers[backend].receiver(room, endpoint)

    def op_route(self, host: str, port: int, rank: int = 0) -> dict[str, Any]:
        route = self.client.get_route(host, port, rank)  # type: ignore[union-attr]
        return {"endpoint": route.endpoint, "generation": route.generation}

    def op_init(self, room: int, pages: list[int], decode_prefix_len: int = 0) -> None:
        self.rooms[room].init(pages, decode_prefix_len)

    def op_send(self, room: int, src: list[int], start: int, is_last: bool,
                metadata: dict[str, Any] | None = None) -> None:
        from pdserve.disagg.messages import MetadataRecord

        record = msgspec.convert(metadata, MetadataRecord) if metadata is not None else None
        self.rooms[room].send(src, start, is_last, record)

    def op_abort(self, room: int) -> None:
        self.rooms[room].abort()

    def op_state(self, room: int) -> dict[str, Any]:
        obj = self.rooms[room]
        state = obj.poll()
        out: dict[str, Any] = {"state": int(state), "failure": obj.failure}
        if hasattr(obj, "metadata"):
            record = obj.metadata()
            out["metadata"] = msgspec.to_builtins(record) if record is not None else None
        else:
            out["num_dst_pages"] = obj.num_dst_pages
            out["decode_prefix_len"] = obj.decode_prefix_len
        return out

    def op_wait(self, room: int, seconds: float, until: int | None = None) -> dict[str, Any]:
        from pdserve.disagg.transfer import KVPoll

        self.rooms[room].wait(seconds, KVPoll(until) if until is not None else None)
        return self.op_state(room)

    def op_pool(self) -> dict[str, Any]:
        import torch

        return {name: t.reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in (("k", self.k), ("v", self.v))}

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def op_exit(self) -> None:
        return None

    # --- benchmark helpers --------------------------------------------------------------------

    def op_bench_send(self, backend: str, room: int, src: list[int], chunks: int = 1,
                      timeout: float = 60.0) -> dict[str, Any]:
        """Time one room: from the first send to the sender's Success (decode's Ack)."""
        from pdserve.disagg.messages import MetadataRecord
        from pdserve.disagg.transfer import KVPoll

        s = self.managers[backend].sender(room)
        if s.wait(timeout, KVPoll.WaitingForInput) != KVPoll.WaitingForInput:
            raise RuntimeError(f"no RoomInfo for room {room}: {s.failure}")
        step = -(-len(src) // chunks)
        t0 = time.perf_counter()
        for start in range(0, len(src), step):
            last = start + step >= len(src)
            s.send(src[start:start + step], start, last, MetadataRecord(room=room, first_token=1) if last else None)
        state = s.wait(timeout)
        elapsed = time.perf_counter() - t0
        if state != KVPoll.Success:
            raise RuntimeError(f"room {room} ended {state.name}: {s.failure}")
        return {"seconds": elapsed}

    def op_memcpy(self, nbytes: int, reps: int = 5) -> dict[str, Any]:
        """Best time of one plain memcpy (numpy copyto of uint8 arrays) of `nbytes`."""
        import numpy as np

        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.zeros(nbytes, dtype=np.uint8)
        np.copyto(dst, src)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t0)
        return {"seconds": best}

    def op_sock_recv(self, nbytes: int, reps: int = 1) -> dict[str, Any]:
        """Accept one raw TCP connection and receive `nbytes` `reps` times, acking each with a byte."""
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.settimeout(30)

        def serve() -> None:
            buf = memoryview(bytearray(nbytes))
            conn, _ = lsock.accept()
            with conn, lsock:
                for _ in range(reps):
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(buf[got:])
                        if n == 0:
                            return
                        got += n
                    conn.sendall(b"k")

        threading.Thread(target=serve, daemon=True).start()
        return {"port": lsock.getsockname()[1]}

    def op_sock_send(self, port: int, nbytes: int, reps: int = 1) -> dict[str, Any]:
        """Send `nbytes` `reps` times on one connection; the time of the last (warm) send + ack."""
        payload = memoryview(bytearray(b"\x01" * nbytes))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for _ in range(reps):
                t0 = time.perf_counter()
                sock.sendall(payload)
                if sock.recv(1) != b"k":
                    raise RuntimeError("raw socket peer closed early")
                elapsed = time.perf_counter() - t0
        return {"seconds": elapsed}
