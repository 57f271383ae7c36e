"""From a decision (P prefill, D decode) and the workers there are to the actions that get there (pure).

`plan_actions` prefers the cheapest move first, each at most `max_actions` per interval:

  1. switch roles: while one role is short and the other has more than it needs, the
     surplus worker with the fewest requests in flight switches (drain + swap + register:
     a second or two, no weights loaded);
  2. start workers: a role still short and fewer than `max_workers` workers (counting ones
     starting): a new worker of the role that is shorter (ties: prefill);
  3. stop workers (only with `shrink`, i.e. not a fixed fleet): a role with more than it
     needs while the other is not short: a worker the connector started (it cannot stop
     others), fewest in flight first.
A role never drops below one worker, and nothing moves while the decision is met.

    workers 1P 2D, decision 2P 1D  ->  switch the idler decode to prefill
    workers 1P 1D, decision 2P 2D  ->  start prefill, start decode (max_workers 4)
    workers 3P 1D, decision 1P 1D  ->  stop two prefills it started (shrink)
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerView:
    url: str
    role: str  # prefill | decode
    in_flight: int = 0
    owned: bool = False  # the connector started it (and may stop it)


@dataclass(frozen=True)
class Action:
    kind: str  # switch | start | stop
    role: str  # switch, start: the role it ends in; stop: the role it had
    url: str | None = None  # switch, stop: which worker

    def describe(self) -> str:
        return f"{self.kind} {self.role}" + (f" {self.url}" if self.url else "")


def plan_actions(workers: list[WorkerView], want: dict[str, int], max_workers: int, starting: dict[str, int],
                 can_start: bool = True, shrink: bool = False, max_actions: int = 1) -> list[Action]:
    """See the module docstring; `want` and `starting` map each role to a count."""
    have = {r: sum(1 for w in workers if w.role == r) + starting.get(r, 0) for r in ROLES}
    target = {r: max(1, want.get(r, 1)) for r in ROLES}
    free = sorted(workers, key=lambda w: w.in_flight)
    actions: list[Action] = []

    def short(r: str) -> int:
        return target[r] - have[r]

    for to, frm in (("prefill", "decode"), ("decode", "prefill")):
        while short(to) > 0 and have[frm] > target[frm] and len(actions) < max_actions:
            w = next(w for w in free if w.role == frm)
            free.remove(w)
            actions.append(Action("switch", to, w.url))
            have[to], have[frm] = have[to] + 1, have[frm] - 1
    while can_start and len(actions) < max_actions and sum(have.values()) < max_workers and \
            max(short(r) for r in ROLES) > 0:
        role = max(ROLES, key=short)  # ties: prefill (first)
        actions.append(Action("start", role))
        have[role] += 1
    for role in ROLES:
        while shrink and len(actions) < max_actions and short(role) < 0 and all(short(r) <= 0 for r in ROLES):
            mine = [w for w in free if w.role == role and w.owned]
            if not mine:
                break
            free.remove(mine[0])
            actions.append(Action("stop", role, mine[0].url))
            have[role] -= 1
    return actions
