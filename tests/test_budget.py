"""Budget matching and the suite-spec keys: budgets as counts or percentages, sizes within 10%
or reported with their distance, seeds, per-task models and methods."""
from __future__ import annotations

import pytest

from peftlab.budget import WITHIN, fit_budgets
from peftlab.errors import SpecError, UserError
from peftlab.spec import budget_params, parse_spec
from peftlab.workers.methods import TaskInfo
from peftlab.workers.models import load_image_classifier, meta_classifier


def _spec(**extra) -> dict:
    return {"name": "t", "tasks": [{"dataset": "sst2"}], "methods": {"lora": {}, "bitfit": {}}, **extra}


def test_budget_as_count_or_percentage():
    assert budget_params(50_000, 10**6) == 50_000
    assert budget_params("0.5%", 22_713_216) == 113_566
    assert budget_params(" 2 % ", 1_000) == 20


@pytest.mark.parametrize("budget, problem", [
    (0, "at least 1"), ("5 params", "percentage"), ("0%", "percentage"), ("150%", "percentage"), (True, "count"),
])
def test_bad_budgets_are_one_problem_each(budget, problem):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(budget=budget))
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("budget:")
    assert problem in err.value.problems[0]


def test_a_size_hyperparameter_cannot_also_be_set():
    with pytest.raises(SpecError, match=r"methods\.lora\.r: set by `budget`"):
        parse_spec({**_spec(budget=10_000), "methods": {"lora": {"r": 8}}})


def test_methods_are_sized_to_the_budget_or_reported():
    spec = parse_spec({**_spec(budget="1%"), "methods": {"lora": {}, "dora": {}, "vera": {}, "bitfit": {}, "full": {}}})
    model = meta_classifier("minilm", 2)
    fits = {f.method: f for f in fit_budgets(spec, {"sst2": (model, TaskInfo("text-classification", 2, ("classifier",)))})}
    total = sum(p.numel() for p in model.parameters())
    for name in ("lora", "dora", "vera"):
        fit = fits[name]
        assert fit.budget == round(total / 100) and fit.size and not fit.note, fit
        assert abs(fit.expected - fit.budget) <= WITHIN * fit.budget
    assert fits["bitfit"].note.startswith("fixed size") and fits["bitfit"].deviation < -WITHIN
    assert fits["full"].note.startswith("fixed size") and fits["full"].expected == total


def test_a_budget_too_small_for_any_size_is_reported(data_dir):
    spec = parse_spec({"name": "t", "budget": 1_000, "methods": {"lora": {}},
                       "tasks": [{"type": "image-classification", "dataset": "breastmnist"}]})
    model, _ = load_image_classifier("resnet20-cifar10", 2, data_dir, meta=True)
    [fit] = fit_budgets(spec, {"breastmnist": (model, TaskInfo("image-classification", 2, ("net.linear",)))})
    assert fit.size == {"r": 1} and fit.expected > fit.budget
    assert fit.note.startswith("closest r: +") and "of the budget" in fit.note


def test_every_sparse_method_off_its_budget_is_named_in_one_refusal():
    spec = parse_spec({**_spec(budget=10), "methods": {"gps": {}, "lora": {}, "spt": {}}})
    model = meta_classifier("minilm", 2)
    with pytest.raises(UserError) as err:
        fit_budgets(spec, {"sst2": (model, TaskInfo("text-classification", 2, ("classifier",)))})
    message = str(err.value)
    assert message.startswith("budget: gps cannot train 10 parameters on sst2") and "\n" not in message
    assert "; spt cannot train 10 parameters on sst2" in message and "lora" not in message


def test_seeds_and_per_task_methods_and_models():
    spec = parse_spec({"name": "t", "seeds": 3, "methods": {"lora": {}, "ia3": {}},
                       "tasks": [{"dataset": "sst2"},
                                 {"type": "image-classification", "dataset": "mnist", "methods": ["lora"]}]})
    assert spec.final_seeds == [0, 1, 2]
    text, image = spec.tasks
    assert spec.methods_for(text) == ["lora", "ia3"] and spec.methods_for(image) == ["lora"]
    assert spec.model_for(text) == "minilm" and spec.model_for(image) == "resnet20-cifar10"
    assert image.metric == "accuracy" and image.domain == "vision/digits"
    assert parse_spec({**_spec(), "seeds": [3, 7]}).final_seeds == [3, 7]


@pytest.mark.parametrize("extra, problem", [
    ({"seeds": 0}, "seeds: give a number of seeds"),
    ({"seeds": [1, 1]}, "seeds: give a number of seeds"),
    ({"tasks": [{"dataset": "sst2", "methods": ["dora"]}]}, "tasks[0].methods: ['dora'] not in the experiment's"),
    ({"tasks": [{"type": "causal-lm", "dataset": "x.jsonl"}]}, "tasks[0].model: a causal-lm task needs a model"),
    ({"model": "m", "tasks": [{"dataset": "sst2"}, {"type": "causal-lm", "dataset": "x.jsonl"}]},
     "optimised in different directions"),
    ({"tasks": [{"dataset": "sst2", "metric": "auroc"}]}, "'validation/auroc' is not reported by tasks[0]"),
])
def test_suite_spec_problems(extra, problem):
    with pytest.raises(SpecError) as err:
        parse_spec({**_spec(), **extra})
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_multi_worker_limits_are_found_at_validation():
    with pytest.raises(SpecError) as err:
        parse_spec({**_spec(), "methods": {"adalora": {}, "lora": {}}, "resources": {"workers_per_trial": 2},
                    "training": {"batch_size": 1}})
    assert any(p.startswith("training.batch_size: 1 is below workers_per_trial") for p in err.value.problems)
    assert any(p.startswith("methods.adalora: reshapes itself") for p in err.value.problems)
