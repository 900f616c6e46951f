"""The cross-domain suite end to end: examples/cross_domain.yaml in --smoke mode through the real
CLI, Ray, MLflow and store: its four tasks on their four models (MiniLM, the CIFAR ResNet, peftlab's
ViT and Llama-style decoder), budget sizing, seed re-runs, CIs and ranks.

Four of its methods run (LoRA, DoRA: the budget-sized ones; ETHER, a seed method, on the encoder,
the ViT and the decoder; VPT on the ViT), each at the first learning rate of its grid, which keeps
every path the example takes at a sixth of its trials; `peftlab validate` checks the whole example."""
from __future__ import annotations

import json

import pytest
import yaml
from test_sweep import ROOT, invoke, mlflow_runs, run_cli

from peftlab.spec import load_spec
from peftlab.store import ResultsStore, TrialStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]
KEPT = {"fomc": ("lora", "dora", "ether"), "breastmnist": ("lora", "dora"),
        "breastmnist-vit": ("lora", "ether", "vpt"), "sst2-instruct": ("lora", "ether")}
"""Per task (by its label), the example's methods the smoke run keeps."""


def label(task: dict) -> str:
    return task.get("name") or task["dataset"]


def test_cross_domain_smoke(tmp_path, data_dir, built_backbones):
    home = tmp_path / "runs"
    example = yaml.safe_load((ROOT / "examples" / "cross_domain.yaml").read_text())
    kept = sorted({m for methods in KEPT.values() for m in methods})
    example["methods"] = {name: {**example["methods"][name], "lr": example["methods"][name]["lr"][0]}
                          for name in kept}
    assert {label(task) for task in example["tasks"]} == set(KEPT)
    for task in example["tasks"]:
        assert set(KEPT[label(task)]) <= set(task["methods"])
        task["methods"] = list(KEPT[label(task)])
    path = tmp_path / "cross_domain.yaml"
    path.write_text(yaml.safe_dump(example, sort_keys=False))
    # Minutes on a 2-core machine; the limit is generous because a CI machine may be shared.
    done = run_cli("run", str(path), "--smoke", home=home, timeout=2700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Parameter budget per task" in done.stdout

    spec = load_spec(path)
    assert {spec.model_for(task) for task in spec.tasks} == {"minilm", "resnet20-cifar10", "peftlab-vit",
                                                              "peftlab-llama"}
    name = "cross-domain-smoke"
    trials = ResultsStore(f"sqlite:///{home / 'results.db'}").trials(name)
    assert not [t for t in trials if t.status is TrialStatus.FAILED], [(t.task, t.method, t.error) for t in trials]
    domains = {t.task: t.domain for t in trials}
    assert domains == {task.label: task.domain for task in spec.tasks}
    assert set(domains.values()) == {"finance/monetary-policy", "medical/ultrasound", "nlp/sentiment"}

    for task in spec.tasks:
        ran = [t for t in trials if t.task == task.label]
        assert {t.method for t in ran} == set(spec.methods_for(task)) == set(KEPT[task.label])
        retention = "validation/forgetting" if task.type == "causal-lm" else "validation/drift"
        for t in ran:
            metric = f"validation/{task.metric}"
            assert metric in t.final_metrics and retention in t.final_metrics, (t.task, t.method)
            assert t.test_objective == t.final_metrics[f"test/{task.metric}"], (t.task, t.method)
        # Each method's configuration ran with both smoke seeds (the search's seed 0 reused).
        for method in spec.methods_for(task):
            completed = [t for t in ran if t.method == method and t.status is TrialStatus.COMPLETED]
            assert {t.seed for t in completed} == {0, 1}, (task.label, method)

    # Text LoRA and DoRA meet the 1% budget within 10%; the achieved count is what was recorded.
    for t in trials:
        if t.task == "fomc" and t.method in ("lora", "dora"):
            budget = round(t.total_params / 100)
            assert abs(t.trainable_params - budget) <= 0.1 * budget, (t.task, t.method, t.trainable_params)
            assert t.hparams["r"] > 8  # sized up from the default
    # Deep VPT on the ViT is sized to the budget too: prompt tokens at each of its 6 layers.
    vpt = [t for t in trials if t.method == "vpt"]
    assert vpt and all(t.hparams["deep"] and t.hparams["num_tokens"] > 5 for t in vpt)
    assert all(abs(t.trainable_params - round(t.total_params / 100)) <= 0.1 * t.total_params / 100 for t in vpt)

    _, runs = mlflow_runs(home, name)
    assert set(runs) == {t.trial_id for t in trials}
    assert {r.data.tags["peftlab.phase"] for r in runs.values()} == {"search", "seeds"}

    shown = invoke("results", name, home=home)
    assert shown.returncode == 0, shown.stderr
    assert "Across seeds" in shown.stdout and "95% CI" in shown.stdout and "Holm" in shown.stdout
    assert "Average rank across tasks" in shown.stdout
    # The same three tables in json; csv gives one of them at a time.
    document = json.loads(invoke("results", name, "--format", "json", home=home).stdout)
    pairs = sum(len(methods) for methods in KEPT.values())
    assert len(document["leaderboard"]) == len(document["seeds"]) == pairs
    assert {row["verdict"] for row in document["seeds"]} <= {"best", "tied", "worse", "untested"}
    assert sum(row["verdict"] == "best" for row in document["seeds"]) == len(KEPT)  # one per task
    assert all(row["n_seeds"] == 2 for row in document["seeds"])
    assert {row["method"] for row in document["ranks"]} == set(kept)
    seeds_csv = invoke("results", name, "--format", "csv", "--table", "seeds", home=home)
    assert seeds_csv.returncode == 0 and seeds_csv.stdout.count("\n") == 1 + len(document["seeds"])
    for method in spec.methods:
        assert method in shown.stdout
