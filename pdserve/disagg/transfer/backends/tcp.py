"""The tcp backend (default): the prefill pushes page bytes over the session's TCP connection.

Lifecycle of a send (runs in the room's shard consumer on the prefill):
  plan frames over (runs x layer groups) -> per frame one `sendmsg` of the DataFrame header plus
  the pool's page spans as iovecs (zero-copy gather from the pool) -> Done after the last task.
On the decode, the session reader takes each DataFrame header, checks it against the room's
reserved pages, and `recvmsg_into`s the payload straight into the destination spans (zero-copy
scatter), inside the room's begin_write/end_write; a frame for an unknown or failing room is
drained and dropped. Done carries the number of frames sent; decode checks it got them all.
A head-sliced room (pages.py) gathers each slice into a contiguous span on the prefill and
scatters it from a staging buffer on the decode: one extra copy per side, the wire bytes exact.

One ordered stream per (prefill rank, decode rank): loopback and LAN saturate one Python
stream; parallel streams are the job of nixl/mooncake.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.messages import DataFrame, Done, HeadSlice, KVLayout
from pdserve.disagg.transfer.backends.pages import FramePlan, PoolBytes, Run, plan_frames
from pdserve.disagg.transfer.sessions.data_path import IncomingRoom
from pdserve.disagg.transfer.sessions.manager import SessionTransferManager
from pdserve.disagg.transfer.sessions.wire import FrameSocket


class TcpTransferManager(SessionTransferManager):
    backend_name = "tcp"
    one_sided = False

    def __init__(self, role: str, k: torch.Tensor, v: torch.Tensor | None, page_size: int, layout: KVLayout,
                 config: DisaggConfig, host: str = "127.0.0.1", **kwargs: Any) -> None:
        self.pool = PoolBytes(k, v, page_size)  # zero-copy byte views of the pool, made once
        super().__init__(role, k, v, page_size, layout, config, host, **kwargs)

    def write_pages(self, sock: FrameSocket, region: Any, room: int, runs: list[Run],
                    executor: ThreadPoolExecutor | None, heads: HeadSlice | None = None) -> int:
        n = self.pool.tensors
        if heads is None:
            plans = plan_frames(runs, self.pool.num_layers, self.pool.span, tensors=n)
        else:  # gathered into one buffer per frame: no iovec limit, only the frame size
            plans = plan_frames(runs, self.pool.num_layers, self.pool.slice_span(heads), max_iov=1 << 30, tensors=n)
        for seq, plan in enumerate(plans):
            header = DataFrame(room=room, seq=seq, layer_start=plan.layer_start, layer_end=plan.layer_end,
                               runs=[(d, n) for _, d, n in runs[plan.run_start:plan.run_end]], nbytes=plan.nbytes)
            if heads is None:
                sock.send(header, self.pool.spans(runs, plan, side=0))
            else:
                sock.send(header, [memoryview(self.pool.gather_heads(runs, plan, heads).reshape(-1))])
        return len(plans)

    def read_frame(self, sock: FrameSocket, frame: DataFrame, receiver: IncomingRoom | None) -> None:
        if receiver is None:
            sock.discard(frame.nbytes)
            return
        problem = self._validate(frame, receiver)
        if problem is not None:
            receiver.state.fail(f"bad DataFrame from prefill: {problem}")
            sock.discard(frame.nbytes)
            return
        if not receiver.state.begin_write():
            sock.discard(frame.nbytes)
            return
        got = 0
        try:
            runs = [(0, d, n) for d, n in frame.runs]
            plan = FramePlan(0, len(runs), frame.layer_start, frame.layer_end, frame.nbytes)
            if receiver.heads is None:
                got = sock.recv_scatter(list(self.pool.spans(runs, plan, side=1)), lambda: receiver.state.failing)
            else:
                staged = self.pool.staging(runs, plan, receiver.heads)
                got = sock.recv_scatter([memoryview(staged.reshape(-1))], lambda: receiver.state.failing)
                if got == frame.nbytes:
                    self.pool.scatter_heads(runs, plan, receiver.heads, staged)
            if got == frame.nbytes:
                receiver.frames += 1
        finally:
            receiver.state.end_write()
        if got < frame.nbytes:  # the room failed mid-frame: drop the rest without writing
            sock.discard(frame.nbytes - got)

    def _validate(self, frame: DataFrame, receiver: IncomingRoom) -> str | None:
        if not 0 <= frame.layer_start < frame.layer_end <= self.pool.num_layers:
            return f"layers [{frame.layer_start}, {frame.layer_end}) outside 0..{self.pool.num_layers}"
        pages = 0
        for d, n in frame.runs:
            if n < 1 or any(p not in receiver.dst_set for p in range(d, d + n)):
                return f"pages {d}..{d + n - 1} were not reserved for room {receiver.room}"
            pages += n
        span = self.pool.span if receiver.heads is None else self.pool.slice_span(receiver.heads)
        expected = self.pool.tensors * (frame.layer_end - frame.layer_start) * pages * span
        if expected != frame.nbytes:
            return f"payload of {frame.nbytes} bytes, expected {expected}"
        return None

    def check_done(self, receiver: IncomingRoom, done: Done) -> str | None:
        if receiver.frames != done.num_frames:
            return f"received {receiver.frames} of {done.num_frames} data frames"
        return None
