"""The tensor-parallel group of one engine: its collectives (for the model) and the step
broadcast (for the ranks that follow rank 0's scheduler).

Lifecycle:
  rank 0   store = host_store(host)                 # TCPStore on an ephemeral port of `host`
           start the other ranks with (host, store.port)
  every    group = TPGroup.join(rank, size, host, port, device, store)
  per step rank 0 group.send_bytes(plan); others plan = group.recv_bytes()
           the forward: all_reduce / gather_vocab (model/tp.py's Collectives)
  end      group.close()

Two process groups over the same ranks: the compute group (NCCL on CUDA, gloo on CPU) with a
short timeout, so a dead rank fails the step instead of hanging it; and a gloo group with a
long timeout for the plans, on which idle followers wait between steps. Plans are bytes
(msgspec, encoded by the caller) in a uint8 tensor, length first: nothing is pickled.
Sockets bind to the interface toward `host` (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME unless
set) and the store to `host` itself, never to every interface.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

COMPUTE_TIMEOUT = timedelta(seconds=60)  # a collective inside a step
PLAN_TIMEOUT = timedelta(days=7)  # a follower waiting for the next step (an idle server)


def interface_of(host: str) -> str:
    """The network interface this machine reaches `host` through: the one that owns the
    address on node 0 (lo for 127.0.0.1), the one the route to it leaves by elsewhere."""
    ip = socket.gethostbyname(host)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((ip, 9))  # UDP connect sends nothing: it only picks the route's source
        local = probe.getsockname()[0]
    except OSError as exc:
        raise ValueError(f"no route to {ip} (from {host!r}): {exc}") from None
    finally:
        probe.close()
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    raise ValueError(f"no local interface has the address {local} (toward {ip})")


@contextlib.contextmanager
def socket_interface(iface: str) -> Iterator[None]:
    """GLOO/NCCL_SOCKET_IFNAME = iface (unless set) only while groups are made (gloo and NCCL
    read them then), so that processes this one starts later do not inherit another
    rendezvous' interface."""
    saved = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    for k, v in saved.items():
        os.environ[k] = v or iface
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def host_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on host:port (port 0: any free one, no race). We bind the
    socket ourselves: torch's own would listen on every interface."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    store = dist.TCPStore(host, sock.getsockname()[1], world_size, is_master=True, timeout=COMPUTE_TIMEOUT,
                          wait_for_workers=False, master_listen_fd=sock.detach())
    return store


class TPGroup:
    """Implements model/tp.py's Collectives over torch.distributed."""

    def __init__(self, rank: int, size: int, compute: dist.ProcessGroup, plans: dist.ProcessGroup,
                 device: torch.device, store: dist.Store) -> None:
        self.rank, self.size, self.device = rank, size, device
        self._compute, self._plans = compute, plans
        self.store = store  # the rendezvous store: other services of the group exchange addresses in it

    @classmethod
    def join(cls, rank: int, size: int, host: str, port: int, device: torch.device,
             store: dist.TCPStore | None = None) -> TPGroup:
        with socket_interface(interface_of(host)):
            if store is None:
                store = dist.TCPStore(host, port, size, is_master=False, timeout=COMPUTE_TIMEOUT)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COMPUTE_TIMEOUT)
            plans = dist.new_group(list(range(size)), timeout=PLAN_TIMEOUT, backend="gloo")
        return cls(rank, size, dist.group.WORLD, plans, device, store)

    # ---- model collectives ---------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self._compute)
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=0, group=self._compute)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        return x  # every rank computes the same rows

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(y)

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows  # every rank has every token

    # ---- step plans (rank 0 -> the others) -------------------------------------------------
    def send_bytes(self, data: bytes) -> None:
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src=0, group=self._plans)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self._plans)

    def recv_bytes(self) -> bytes:
        n = torch.empty(1, dtype=torch.int64)
        dist.broadcast(n, src=0, group=self._plans)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self._plans)
        return buf.numpy().tobytes()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
