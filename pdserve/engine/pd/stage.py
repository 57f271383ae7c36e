"""The stage protocol between the engine and its PD mode, and the do-nothing unified stage.

Per `Engine.step`:
    for each aborted request the stage owns:  stage.abort(req)   (answered later by poll)
    finished, progressed = stage.poll()       the engine finishes `finished` (pages back) and
                                              streams `progressed` (e.g. committed first tokens)
    ... schedule, forward, sample ...
    handed_off = stage.after_forward(chunks)  requests that left the batch for the stage;
                                              the engine emits nothing for them this step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.batch import Chunk
from pdserve.engine.messages import Bootstrap, TransferStats
from pdserve.engine.request import Request
from pdserve.engine.scheduler import Scheduler


@dataclass(frozen=True)
class Finished:
    """A request the stage is done with; the engine releases its pages and answers it."""

    req: Request
    reason: str  # "abort" | "stop" | "length"
    error: str | None = None
    status: int = 503  # HTTP status of `error` (400: the client's fault, e.g. a taken room)
    keep_in_cache: bool = True  # False: its pages' bytes cannot be trusted (failed transfer)


@dataclass
class StagePoll:
    finished: list[Finished] = field(default_factory=list)
    progressed: list[Request] = field(default_factory=list)  # new tokens to stream (or finished by a stop)

    def __bool__(self) -> bool:
        return bool(self.finished or self.progressed)


class Stage(Protocol):
    stats: TransferStats | None  # cumulative transfers (None in unified mode)

    def pending(self) -> int:
        """Requests waiting in the stage's own queues (not in the scheduler)."""
        ...

    def add(self, req: Request, boot: Bootstrap) -> None: ...
    def owns(self, req: Request) -> bool: ...
    def abort(self, req: Request) -> None: ...
    def poll(self) -> StagePoll: ...
    def after_forward(self, chunks: list[Chunk]) -> set[Request]: ...
    def live(self) -> list[Request]: ...
    def close(self) -> None: ...


class NullStage:
    """Unified mode: every request runs locally (bootstrap fields are ignored, as a unified
    server does); there is nothing to wait for."""

    stats: TransferStats | None = None

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def pending(self) -> int:
        return 0

    def add(self, req: Request, boot: Bootstrap) -> None:
        self.scheduler.add(req)

    def owns(self, req: Request) -> bool:
        return False

    def abort(self, req: Request) -> None:
        raise AssertionError("a unified engine owns no PD request")

    def poll(self) -> StagePoll:
        return StagePoll()

    def after_forward(self, chunks: list[Chunk]) -> set[Request]:
        return set()

    def live(self) -> list[Request]:
        return []

    def close(self) -> None:
        pass
