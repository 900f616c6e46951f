"""Spec -> Ray Tune: the trial configurations, search algorithm and scheduler of each task.

A trial's config is `{"method": m, m: {its hyperparameters}, "seed": s}`: the method is the
top-level choice and only that method's hyperparameters are ever sampled for it.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import Any

from peftlab.search_space import Leaf
from peftlab.spec import ExperimentSpec, MethodSpace, TaskSpec, method_spaces

@dataclass(frozen=True)
class TaskPlan:
    """What will run for one task."""

    task: TaskSpec
    metric: str
    mode: str
    spaces: dict[str, MethodSpace]
    configs: list[dict] | None  # materialized for random and grid; None for optuna
    num_trials: int


def _random_configs(spaces: dict[str, MethodSpace], num_samples: int, rng: random.Random) -> list[dict]:
    # Methods take turns so every method gets its share of a small budget.
    names = list(spaces)
    configs = []
    for i in range(num_samples):
        method = names[i % len(names)]
        leaves = spaces[method].leaves
        configs.append({"method": method, method: {k: leaf.sample(rng) for k, leaf in leaves.items()}})
    return configs


def _grid_configs(spaces: dict[str, MethodSpace], repeats: int) -> list[dict]:
    configs = []
    for method, space in spaces.items():
        keys = list(space.leaves)
        for values in itertools.product(*(space.leaves[k].grid_values() for k in keys)):
            configs.append({"method": method, method: dict(zip(keys, values))})
    return configs * repeats


def _with_seeds(configs: list[dict], seeds: list[int]) -> list[dict]:
    return [{**config, "seed": seed} for config in configs for seed in seeds]


def plan_task(spec: ExperimentSpec, index: int, sizes: dict[str, dict] | None = None) -> TaskPlan:
    """The task's trials; `sizes` fixes methods' size hyperparameters ({method: {name: value}})."""
    task = spec.tasks[index]
    spaces, _ = method_spaces(spec)
    spaces = {name: spaces[name] for name in spec.methods_for(task)}
    for name, fixed in (sizes or {}).items():
        if name in spaces:
            leaves = {**spaces[name].leaves, **{k: Leaf("fixed", (v,)) for k, v in fixed.items()}}
            spaces[name] = MethodSpace(name, leaves)
    seeds = spec.training.seeds
    samples = spec.search.samples * (len(spaces) if spec.search.per_method else 1)
    configs = None
    if spec.search.algorithm == "random":
        configs = _with_seeds(_random_configs(spaces, samples, random.Random(spec.search.seed + index)), seeds)
    elif spec.search.algorithm == "grid":
        configs = _with_seeds(_grid_configs(spaces, spec.search.samples), seeds)
    num_trials = len(configs) if configs is not None else samples * len(seeds)
    return TaskPlan(task, spec.metric_for(task), spec.mode_for(task), spaces, configs, num_trials)


def plan(spec: ExperimentSpec, sizes: dict[str, dict[str, dict]] | None = None) -> list[TaskPlan]:
    """Every task's plan; `sizes` maps a task label to its methods' budget sizes."""
    return [plan_task(spec, i, (sizes or {}).get(task.label)) for i, task in enumerate(spec.tasks)]


def seed_plan(task_plan: TaskPlan, best: dict[str, dict], seeds: list[int], done: set) -> TaskPlan:
    """Re-runs of each method's best configuration (`best`: method -> resolved hyperparameters)
    with every seed, except the (method, seed) pairs in `done` (already run with that config)."""
    configs = [{"method": m, m: hp, "seed": s} for m, hp in best.items() for s in seeds if (m, s) not in done]
    return TaskPlan(task_plan.task, task_plan.metric, task_plan.mode, task_plan.spaces, configs, len(configs))


def optuna_space(spaces: dict[str, MethodSpace]):
    """A define-by-run function: choose the method, then suggest only its hyperparameters."""

    def define(trial) -> dict[str, Any]:
        method = trial.suggest_categorical("method", list(spaces))
        constants: dict[str, Any] = {"method": method}
        for key, leaf in spaces[method].leaves.items():
            name = f"{method}/{key}"  # Tune unflattens "/" into {method: {key: value}}
            if leaf.kind == "fixed":
                constants[name] = leaf.values[0]
                continue
            value = leaf.suggest(trial, name)
            if isinstance(value, list):
                constants[name] = value
        return constants

    return define


def build_search_alg(spec: ExperimentSpec, task_plan: TaskPlan):
    """The Tune search algorithm for a task (None: Tune's default variant generator)."""
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    from peftlab.searchers import EvaluationsOnly

    if task_plan.configs is not None:
        return _fixed_configs(task_plan.configs)
    import optuna

    searcher = OptunaSearch(
        space=optuna_space(task_plan.spaces),
        metric=task_plan.metric,
        mode=task_plan.mode,
        sampler=optuna.samplers.TPESampler(seed=spec.search.seed),
        # Each method runs once before TPE starts choosing between them.
        points_to_evaluate=[{"method": m} for m in task_plan.spaces],
    )
    seeds = spec.training.seeds
    return EvaluationsOnly(Repeater(searcher, repeat=len(seeds), set_index=True) if len(seeds) > 1 else searcher)


def _fixed_configs(configs: list[dict]):
    """A Tune searcher that hands out pre-built configs in order (random and grid search)."""
    from ray.tune.search import Searcher

    class FixedConfigs(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.pending = list(configs)

        def suggest(self, trial_id: str) -> dict | None:
            return self.pending.pop(0) if self.pending else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            pass

        # Saved with the experiment so `peftlab resume` hands out only what is left.
        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "w") as f:
                json.dump(self.pending, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path) as f:
                self.pending = json.load(f)

    return FixedConfigs()


def rung_plan(spec: ExperimentSpec, task_plan: TaskPlan):
    """The task's successive-halving rungs (rungs.py) under `scheduler: asha`, else None. Trials
    meet them in index order and stop themselves, so Tune itself schedules first in, first out."""
    from peftlab.workers.rungs import RungPlan, rung_steps

    if spec.search.scheduler == "fifo":
        return None
    training = spec.training
    steps = rung_steps(spec.search.grace_period, spec.search.reduction_factor, training.eval_every, training.max_steps)
    by_method = spec.search.rung_groups == "method"
    return RungPlan(steps=steps, reduction_factor=spec.search.reduction_factor, mode=task_plan.mode,
                    by_method=by_method) if steps else None


def describe_leaves(leaves: dict[str, Leaf]) -> str:
    return ", ".join(f"{k}={leaf.describe()}" for k, leaf in leaves.items()) or "(defaults)"
