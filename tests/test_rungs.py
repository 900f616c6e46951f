"""Rung decisions: successive halving's rule, per method or across methods, the same whatever
order trials arrive in, waiting for earlier trials, and carried over a restart of the board."""
from __future__ import annotations

import math
import random

import pytest

from peftlab.workers.rungs import RungBoard, RungPlan, keeps, rung_steps


def test_rung_steps_grow_by_the_reduction_factor_below_the_last_step():
    assert rung_steps(1, 2, 50, 300) == (50, 100, 200)
    assert rung_steps(2, 3, 10, 180) == (20, 60)
    assert rung_steps(1, 2, 100, 100) == ()


@pytest.mark.parametrize("value, earlier, expected", [
    (0.5, [], True),                 # alone: goes on
    (0.6, [0.5], True), (0.4, [0.5], False),   # two: the better half (1 of 2)
    (0.5, [0.5], True),              # ties in its favour
    (0.5, [0.9, 0.1], True),         # three: the top ceil(3/2) = 2
    (0.05, [0.9, 0.1], False),
    (float("nan"), [0.1], False), (0.1, [float("nan")], True),
])
def test_keeps_the_top_share(value, earlier, expected):
    assert keeps(value, earlier, 2, "max") is expected


def test_minimised_metrics_keep_the_lowest():
    assert keeps(0.2, [0.3], 2, "min") and not keeps(0.4, [0.3], 2, "min")


def _run(board: RungBoard, trials: dict[str, tuple[str, int, dict[int, float]]], order: list[tuple[str, int]]):
    """Report (trial, step) in `order`, retrying the undecided ones after each report, as waiting
    trials poll; the decisions, once known."""
    for trial_id, (method, index, _) in trials.items():
        board.register(trial_id, method, index)
    decided: dict[tuple[str, int], bool] = {}
    waiting: list[tuple[str, int]] = []

    def poll() -> bool:
        progressed = False
        for trial_id, step in list(waiting):
            if any(not decided[(t, s)] for t, s in decided if t == trial_id):
                waiting.remove((trial_id, step))  # stopped earlier: never reaches this rung
                continue
            if any(t == trial_id and s < step for t, s in waiting):
                continue  # still waiting at an earlier rung: it has not trained on to this one
            answer = board.decide(trial_id, step, trials[trial_id][2][step])
            if answer is not None:
                decided[(trial_id, step)], progressed = answer, True
                waiting.remove((trial_id, step))
                if not answer:
                    board.end(trial_id)
        return progressed

    for item in order:
        waiting.append(item)
        poll()
    while poll():  # the rest decide as the trials they wait for report
        pass
    assert not waiting
    return decided


TRIALS = {  # trial: (method, index, validation value at each rung)
    "a": ("lora", 0, {50: 0.60, 100: 0.70}),
    "b": ("lora", 1, {50: 0.65, 100: 0.69}),
    "c": ("ia3", 2, {50: 0.40, 100: 0.45}),
    "d": ("lora", 3, {50: 0.50, 100: 0.80}),
    "e": ("ia3", 4, {50: 0.42, 100: 0.41}),
}


def _interleaving(rng: random.Random) -> list[tuple[str, int]]:
    """Every trial's rung reports, in step order per trial, trials interleaved at random."""
    queues = {trial_id: [50, 100] for trial_id in TRIALS}
    order = []
    while queues:
        trial_id = rng.choice(sorted(queues))
        order.append((trial_id, queues[trial_id].pop(0)))
        if not queues[trial_id]:
            del queues[trial_id]
    return order


def test_decisions_do_not_depend_on_arrival_order():
    plan = RungPlan(steps=(50, 100), reduction_factor=2, mode="max", by_method=True)
    rng = random.Random(0)
    outcomes = {tuple(sorted(_run(RungBoard(plan, None), TRIALS, _interleaving(rng)).items())) for _ in range(300)}
    assert len(outcomes) == 1
    decided = dict(next(iter(outcomes)))
    # lora: a alone goes on; b (0.65 vs 0.60) goes on; d (0.50 among 0.60, 0.65) is third of 3: stops.
    assert decided[("a", 50)] and decided[("b", 50)] and not decided[("d", 50)]
    # ia3 is compared with ia3 only: c goes on alone, e (0.42 vs 0.40) goes on.
    assert decided[("c", 50)] and decided[("e", 50)]
    assert decided[("a", 100)] and not decided[("b", 100)]  # 0.69 behind a's 0.70
    assert ("d", 100) not in decided


def test_across_methods_every_earlier_trial_counts():
    plan = RungPlan(steps=(50,), reduction_factor=2, mode="max", by_method=False)
    board = RungBoard(plan, None)
    for trial_id, (method, index, _) in TRIALS.items():
        board.register(trial_id, method, index)
    assert board.decide("a", 50, 0.6) is True
    assert board.decide("c", 50, 0.4) is None  # b (index 1) has not reached the rung yet
    assert board.decide("b", 50, 0.65) is True
    assert board.decide("c", 50, 0.4) is False  # third of three across methods


def test_an_earlier_trial_that_has_not_started_or_ended_early():
    plan = RungPlan(steps=(50, 100), reduction_factor=2, mode="max", by_method=True)
    board = RungBoard(plan, None)
    board.register("late", "lora", 1)
    assert board.decide("late", 50, 0.5) is None  # trial 0 has not even started: its method is unknown
    board.register("first", "lora", 0)
    assert board.decide("late", 50, 0.5) is None
    board.end("first")  # failed before its first rung
    assert board.decide("late", 50, 0.5) is True


def test_a_restarted_board_continues_from_its_file(tmp_path):
    plan = RungPlan(steps=(50,), reduction_factor=2, mode="min", by_method=True)
    board = RungBoard(plan, str(tmp_path))
    board.register("a", "lora", 0)
    board.register("b", "lora", 1)
    assert board.decide("a", 50, 0.3) is True
    again = RungBoard(plan, str(tmp_path))
    assert again.snapshot() == board.snapshot()
    assert again.decide("b", 50, 0.4) is False and not math.isnan(again.snapshot()["a"]["values"]["50"])
