"""The cross-domain suite end to end: examples/cross_domain.yaml in --smoke mode through the real
CLI, Ray, MLflow and store: tasks of three domains on both its models, budget sizing, seed re-runs,
CIs and ranks.

Three of its six tasks (sentiment and monetary policy on MiniLM, breast ultrasound on the CIFAR
ResNet) run with two of its methods (LoRA, DoRA: the budget-sized ones), which keeps every path the
example takes at a sixth of its trials; `peftlab validate` checks the whole example."""
from __future__ import annotations

import json

import pytest
import yaml
from test_sweep import ROOT, invoke, mlflow_runs, run_cli

from peftlab.spec import load_spec
from peftlab.store import ResultsStore, TrialStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]
TASKS = ("sst2", "fomc", "breastmnist")


def test_cross_domain_smoke(tmp_path, data_dir):
    home = tmp_path / "runs"
    example = yaml.safe_load((ROOT / "examples" / "cross_domain.yaml").read_text())
    kept = ("lora", "dora")
    example["methods"] = {name: example["methods"][name] for name in kept}
    example["tasks"] = [task for task in example["tasks"] if task["dataset"] in TASKS]
    for task in example["tasks"]:
        task.pop("methods", None)
    path = tmp_path / "cross_domain.yaml"
    path.write_text(yaml.safe_dump(example, sort_keys=False))
    # Minutes on a 2-core machine; the limit is generous because a CI machine may be shared.
    done = run_cli("run", str(path), "--smoke", home=home, timeout=2700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Parameter budget per task" in done.stdout

    spec = load_spec(path)
    assert len(spec.tasks) == len(TASKS) and set(spec.methods) == set(kept)
    assert {spec.model_for(task) for task in spec.tasks} == {"minilm", "resnet20-cifar10"}
    name = "cross-domain-smoke"
    trials = ResultsStore(f"sqlite:///{home / 'results.db'}").trials(name)
    assert not [t for t in trials if t.status is TrialStatus.FAILED], [(t.task, t.method, t.error) for t in trials]
    domains = {t.task: t.domain for t in trials}
    assert domains == {task.label: task.domain for task in spec.tasks}
    assert len(set(domains.values())) == len(TASKS)

    for task in spec.tasks:
        ran = [t for t in trials if t.task == task.label]
        assert {t.method for t in ran} == set(spec.methods_for(task))
        for t in ran:
            metric = f"validation/{task.metric}"
            assert metric in t.final_metrics and "validation/drift" in t.final_metrics, (t.task, t.method)
            assert t.test_objective == t.final_metrics[f"test/{task.metric}"], (t.task, t.method)
        # Each method's best configuration ran with both smoke seeds (the search's seed 0 reused).
        for method in spec.methods_for(task):
            completed = [t for t in ran if t.method == method and t.status is TrialStatus.COMPLETED]
            by_config: dict[str, set] = {}
            for t in completed:
                by_config.setdefault(repr(sorted(t.hparams.items())), set()).add(t.seed)
            assert {0, 1} in by_config.values(), (task.label, method, by_config)

    # Text LoRA and DoRA meet the 1% budget within 10%; the achieved count is what was recorded.
    for t in trials:
        if t.task in ("sst2", "banking77", "fomc") and t.method in ("lora", "dora"):
            budget = round(t.total_params / 100)
            assert abs(t.trainable_params - budget) <= 0.1 * budget, (t.task, t.method, t.trainable_params)
            assert t.hparams["r"] > 8  # sized up from the default

    _, runs = mlflow_runs(home, name)
    assert set(runs) == {t.trial_id for t in trials}
    assert {r.data.tags["peftlab.phase"] for r in runs.values()} == {"search", "seeds"}

    shown = invoke("results", name, home=home)
    assert shown.returncode == 0, shown.stderr
    assert "Across seeds" in shown.stdout and "95% CI" in shown.stdout and "Holm" in shown.stdout
    assert "Average rank across tasks" in shown.stdout
    # The same three tables in json; csv gives one of them at a time.
    document = json.loads(invoke("results", name, "--format", "json", home=home).stdout)
    assert len(document["leaderboard"]) == len(document["seeds"]) == len(TASKS) * len(kept)
    assert {row["verdict"] for row in document["seeds"]} <= {"best", "tied", "worse", "untested"}
    assert sum(row["verdict"] == "best" for row in document["seeds"]) == len(TASKS)  # one per task
    assert all(row["n_seeds"] == 2 for row in document["seeds"])
    assert {row["method"] for row in document["ranks"]} == set(kept)
    seeds_csv = invoke("results", name, "--format", "csv", "--table", "seeds", home=home)
    assert seeds_csv.returncode == 0 and seeds_csv.stdout.count("\n") == 1 + len(document["seeds"])
    for method in spec.methods:
        assert method in shown.stdout
