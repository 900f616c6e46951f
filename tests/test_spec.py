"""Spec parsing and validation, search-space leaves and conditionality of sampled configs."""
from __future__ import annotations

import copy
import random

import optuna
import pytest

from peftlab.errors import SpecError, UserError
from peftlab.search import optuna_space, plan
from peftlab.spec import load_spec, parse_spec

BASE = {
    "name": "t",
    "tasks": [{"dataset": "sst2"}],
    "methods": {
        "lora": {"r": [4, 8], "alpha": 16, "lr": {"loguniform": [1.0e-4, 3.0e-3]}, "target_modules": ["query", "value"]},
        "bitfit": {"lr": {"uniform": [1.0e-4, 1.0e-2]}},
        "full": {},
    },
}


def with_(**changes) -> dict:
    spec = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return spec


def problems(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="s.yaml")
    return str(info.value)


def test_valid_spec_gets_defaults():
    spec = parse_spec(BASE)
    assert spec.model is None and spec.model_for(spec.tasks[0]) == "minilm"
    assert spec.training.seeds == [0]
    assert spec.metric_for(spec.tasks[0]) == "validation/accuracy"
    assert spec.mode_for(spec.tasks[0]) == "max"
    assert spec.tasks[0].label == "sst2"


def test_spec_hash_tracks_content():
    assert parse_spec(BASE).spec_hash() == parse_spec(BASE).spec_hash()
    assert parse_spec(BASE).spec_hash() != parse_spec(with_(training__max_steps=7)).spec_hash()


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntasks: [\n  - {dataset: sst2\n")
    with pytest.raises(UserError, match=r"bad.yaml: invalid YAML at line \d+, column \d+"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("changes, expected", [
    ({"training__max_stepz": 3}, "training.max_stepz: unknown key"),
    ({"tasks": [{"dataset": "sst2", "colour": "red"}]}, "tasks[0].colour: unknown key"),
    ({"methods": {"loraa": {}}}, "methods.loraa: unknown method 'loraa' (known:"),
    ({"methods": {"lora": {"lr": {"loguniform": [1.0e-3, 1.0e-4]}}}}, "methods.lora.lr: empty or inverted range"),
    ({"methods": {"lora": {"lr": {"uniform": [0.1, 0.1]}}}}, "methods.lora.lr: empty or inverted range"),
    ({"methods": {"lora": {"r": []}}}, "methods.lora.r: empty list of choices"),
    ({"methods": {"lora": {"lr": {"normal": [0, 1]}}}}, "methods.lora.lr: a range is one of"),
    ({"methods": {"lora": {"r": {"uniform": [1, 8]}}}}, "methods.lora.r: uniform gives floats; use randint"),
    ({"methods": {"bitfit": {"r": 8}}}, "methods.bitfit.r: 'r' belongs to"),
    ({"methods": {"lora": {"rank": 8}}}, "methods.lora.rank: unknown hyperparameter for lora"),
    ({"search__max_concurrent": 0}, "search.max_concurrent: must be at least 1"),
    ({"search__algorithm": "bayes"}, "search.algorithm:"),
    ({"search__metric": "validation/bleu"}, "search.metric: 'validation/bleu' is not reported"),
    ({"tasks": []}, "tasks:"),
    ({"name": "has space"}, "name:"),
])
def test_bad_spec_names_the_key(changes, expected):
    assert expected in problems(with_(**changes))


def test_all_problems_reported_together():
    message = problems(with_(training__max_stepz=3, methods={"loraa": {}, "lora": {"lr": {"uniform": [2, 1]}}}))
    assert message.startswith("s.yaml: ")
    for part in ("training.max_stepz", "methods.loraa", "methods.lora.lr"):
        assert part in message
    assert "\n" not in message


def test_grid_rejects_ranges():
    assert "grid search needs fixed values or lists" in problems(with_(search__algorithm="grid"))


def test_list_hyperparameter_is_a_value_and_list_of_lists_a_choice():
    spec = parse_spec(with_(methods={"lora": {"target_modules": [["query"], ["query", "value"]]}}))
    leaf = plan(spec)[0].spaces["lora"].leaves["target_modules"]
    assert leaf.kind == "choice" and leaf.values == (["query"], ["query", "value"])
    fixed = plan(parse_spec(BASE))[0].spaces["lora"].leaves["target_modules"]
    assert fixed.kind == "fixed" and fixed.values == (["query", "value"],)


def test_random_configs_are_balanced_seeded_and_conditional():
    spec = parse_spec(with_(search__num_samples=6, training__seeds=[0, 1]))
    configs = plan(spec)[0].configs
    assert len(configs) == 12 and plan(spec)[0].num_trials == 12
    assert configs == plan(spec)[0].configs  # same seed, same configs
    assert [c["method"] for c in configs[::2]] == ["lora", "bitfit", "full"] * 2
    assert [c["seed"] for c in configs[:2]] == [0, 1] and configs[0]["lora"] == configs[1]["lora"]
    for config in configs:
        assert set(config) == {"method", config["method"], "seed"}
        own = set(BASE["methods"][config["method"]])
        assert set(config[config["method"]]) == own
    lora = [c["lora"] for c in configs if c["method"] == "lora"]
    assert all(1e-4 <= c["lr"] <= 3e-3 and c["r"] in (4, 8) and c["alpha"] == 16 for c in lora)


def test_per_method_samples_count_each_tasks_own_methods():
    """`per_method`: num_samples configurations of every method a task runs, none twice (what --smoke
    asks for); without it a task with fewer methods than samples runs some of them twice."""
    tasks = [{"dataset": "sst2"}, {"dataset": "fomc", "methods": ["lora", "bitfit"]}]
    spec = parse_spec(with_(tasks=tasks, search__num_samples=1, search__per_method=True))
    for task_plan, methods in zip(plan(spec), (["lora", "bitfit", "full"], ["lora", "bitfit"])):
        assert [c["method"] for c in task_plan.configs] == methods and task_plan.num_trials == len(methods)
    spec = parse_spec(with_(tasks=tasks, search__num_samples=3))
    assert [c["method"] for c in plan(spec)[1].configs] == ["lora", "bitfit", "lora"]
    optuna_plan = plan(parse_spec(with_(tasks=tasks, search__algorithm="optuna", search__num_samples=2,
                                        search__per_method=True)))
    assert [p.num_trials for p in optuna_plan] == [6, 4]


def test_grid_enumerates_list_values_per_method():
    spec = parse_spec(with_(search__algorithm="grid",
                            methods={"lora": {"r": [4, 8, 16], "lr": [1.0e-3, 1.0e-4]}, "bitfit": {"lr": [1.0e-3]}}))
    configs = plan(spec)[0].configs
    assert len(configs) == 7
    assert sorted((c["lora"]["r"], c["lora"]["lr"]) for c in configs if c["method"] == "lora") == sorted(
        (r, lr) for r in (4, 8, 16) for lr in (1e-3, 1e-4))


def test_optuna_define_by_run_only_suggests_the_chosen_method():
    spec = parse_spec(with_(search__algorithm="optuna"))
    task_plan = plan(spec)[0]
    assert task_plan.configs is None and task_plan.num_trials == spec.search.samples == 4
    define = optuna_space(task_plan.spaces)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = define(trial)
        method = constants["method"]
        seen.add(method)
        names = set(trial.params) | set(constants)
        assert all(n == "method" or n.startswith(f"{method}/") for n in names), names
        study.tell(trial, random.random())
    assert seen == {"lora", "bitfit", "full"}


def test_optuna_learns_the_kept_checkpoint_value_not_the_last_evaluation():
    """A trial that kept an earlier, better checkpoint is told to TPE with that checkpoint's value:
    the value of the configuration that is reported."""
    from peftlab.search import build_search_alg
    from peftlab.workers.report import Costs, Outcome, TrialReport

    spec = parse_spec(with_(search__algorithm="optuna"))
    task_plan = plan(spec)[0]
    searcher = build_search_alg(spec, task_plan)
    assert searcher.suggest("t1")["method"] in task_plan.spaces
    costs = Costs(trainable_params=1, total_params=2)
    middle = TrialReport(step=5, max_steps=10, costs=costs, metrics={"accuracy": 0.8, "loss": 0.4})
    final = TrialReport(step=10, max_steps=10, costs=costs, metrics={"accuracy": 0.6, "loss": 0.7},
                        outcome=Outcome.COMPLETED, selected_step=5, selected_metrics={"accuracy": 0.8, "loss": 0.4,
                                                                                      "drift": 0.1},
                        test_metrics={"accuracy": 0.75})
    # Tune adds its own counters to every result.
    searcher.on_trial_result("t1", {**middle.to_result(), "training_iteration": 1})
    searcher.on_trial_complete("t1", result={**final.to_result(), "training_iteration": 2})
    told = [t for t in searcher.searcher._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in told] == [0.8]
