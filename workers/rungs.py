"""Successive-halving rungs decided by the trials themselves, in an order that does not depend on
which trial arrives first: the same spec and seeds stop the same trials on a busy or idle machine.

At a rung, trial k of a group (its method, or every trial) goes on when its validation value ranks
within the top ceil(n / reduction_factor) of the n values that trials 0..k of its group reached
there. It waits until each earlier trial of its group has reached that rung or ended before it;
trials start in index order, so an earlier trial is never queued behind a waiting one. A stopped
trial still restores, tests and saves its kept checkpoint (train.py).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "peftlab-rungs.json"
POLL_S = 0.2


@dataclass(frozen=True)
class RungPlan:
    steps: tuple[int, ...]
    """Steps at which trials are compared (evaluation steps before the last)."""
    reduction_factor: int
    mode: str
    by_method: bool
    """Compare trials of one method with each other only."""


def rung_steps(grace_period: int, reduction_factor: int, eval_every: int, max_steps: int) -> tuple[int, ...]:
    """grace_period x eval_every x reduction_factor^i, for every such step before max_steps."""
    steps, step = [], grace_period * eval_every
    while step < max_steps:
        steps.append(step)
        step *= reduction_factor
    return tuple(steps)


def keeps(value: float | None, earlier: list[float], reduction_factor: int, mode: str) -> bool:
    """Whether `value` ranks within the top ceil(n / reduction_factor) of itself and `earlier`
    (ties in its favour); a missing or non-finite value never does, unless it is alone."""
    if value is None or not math.isfinite(value):
        return not earlier
    finite = [v for v in earlier if math.isfinite(v)]
    ahead = sum(1 for v in finite if (v > value if mode == "max" else v < value))
    return ahead < math.ceil((len(earlier) + 1) / reduction_factor)


@dataclass
class _Entry:
    group: str
    index: int
    values: dict[str, float | None] = field(default_factory=dict)
    """Rung step (as a string, for JSON) -> the trial's validation value there."""
    ended: bool = False


class RungBoard:
    """The rung values of one task's trials; a Ray actor on the driver's node, whose state is
    written beside the task's Tune state so that a resumed sweep decides as before."""

    def __init__(self, plan: RungPlan, state_dir: str | None) -> None:
        self.plan = plan
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self.entries: dict[str, _Entry] = {}
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.entries = {tid: _Entry(**entry) for tid, entry in saved.items()}

    def _save(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_name(f".{STATE_FILE}.part")
        partial.write_text(json.dumps({tid: asdict(e) for tid, e in self.entries.items()}, sort_keys=True))
        os.replace(partial, self.path)

    def register(self, trial_id: str, method: str, index: int) -> None:
        """A trial started: its group and its place in the order of trials (from 0)."""
        if trial_id not in self.entries:
            self.entries[trial_id] = _Entry("" if not self.plan.by_method else method, index)
            self._save()

    def end(self, trial_id: str) -> None:
        """The trial finished, stopped or failed: it reaches no further rung."""
        if trial_id in self.entries and not self.entries[trial_id].ended:
            self.entries[trial_id].ended = True
            self._save()

    def decide(self, trial_id: str, step: int, value: float | None) -> bool | None:
        """Whether the trial goes on after rung `step`; None while that cannot be known yet."""
        entry = self.entries.get(trial_id)
        if entry is None:
            return None
        if str(step) not in entry.values:
            entry.values[str(step)] = value
            self._save()
        indices = {e.index for e in self.entries.values()}
        if not all(i in indices for i in range(entry.index)):
            return None  # an earlier trial has not started yet: its group is unknown
        earlier = []
        for other in self.entries.values():
            if other.group != entry.group or other.index >= entry.index:
                continue
            if str(step) in other.values:
                earlier.append(other.values[str(step)])
            elif not other.ended:
                return None
        reached = [v if v is not None else math.nan for v in earlier]
        return keeps(entry.values[str(step)], reached, self.plan.reduction_factor, self.plan.mode)

    def snapshot(self) -> dict:
        return {tid: asdict(e) for tid, e in self.entries.items()}


def board_name(experiment: str, task: str) -> str:
    return f"peftlab-rungs:{experiment}:{task}"


def rung_gate(plan: RungPlan, name: str, trial_id: str):
    """For the training loop: at each rung step, ask the board and wait for its answer; at other
    steps go on."""
    import ray

    board = None

    def goes_on(step: int, value: float | None) -> bool:
        nonlocal board
        if step not in plan.steps:
            return True
        board = board or ray.get_actor(name)
        while True:
            answer = ray.get(board.decide.remote(trial_id, step, value))
            if answer is not None:
                return answer
            time.sleep(POLL_S)

    return goes_on
