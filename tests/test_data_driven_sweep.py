"""The data-driven methods and the bias evaluations in one real sweep (CLI, Ray, MLflow, SQLite): GPS,
SPT, Light-PEFT and PEFTDebias beside LoRA and full tuning on a text task with CrowS-Pairs and
WinoBias, and a multiple-choice BBQ task with its bias score; then what the store, `peftlab results`
and MLflow say about costs, pruning and bias."""
from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from peftlab.progress import leaderboard_table
from peftlab.store import ResultsStore, TrialStatus
from test_sweep import invoke, mlflow_runs, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CALIBRATING = {"gps", "spt", "peft_debias"}
LM_SCORES = ("crows_pairs", "crows_pairs_gender", "winobias_gap", "winobias_pro_percent")
BBQ_SCORES = ("bbq_accuracy_ambiguous", "bbq_accuracy_disambiguated", "bbq_bias_ambiguous", "bbq_bias_disambiguated")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_bert_mlm_dir, people_csv, data_dir):
    home = tmp_path_factory.mktemp("runs")
    spec = {
        "name": "data-driven",
        "model": str(tiny_bert_mlm_dir),
        "tasks": [
            {"dataset": str(people_csv), "name": "people", "max_eval_samples": 60,
             "bias_eval": ["crows_pairs", "winobias"], "bias_samples": 24},
            {"type": "multiple-choice", "dataset": "bbq", "categories": ["Age"], "max_train_samples": 64,
             "max_eval_samples": 40, "bias_eval": ["bbq"], "bias_samples": 40, "methods": ["lora", "full"]},
        ],
        "methods": {
            "lora": {"r": 2, "lr": 5e-3},
            "full": {"lr": 1e-3},
            "gps": {"k": 1, "calibration_batches": 3, "lr": 5e-3},
            "spt": {"params": 1000, "r": 2, "calibration_batches": 3, "lr": 5e-3},
            "light_peft": {"r": 2, "estimation_steps": 4, "lr": 5e-3},
            "peft_debias": {"r": 2, "debias_r": 2, "debias_steps": 6, "debias_batch_size": 8, "lr": 5e-3},
        },
        "search": {"algorithm": "grid", "scheduler": "fifo", "max_concurrent": 2},
        "training": {"max_steps": 12, "eval_every": 6, "batch_size": 8, "max_length": 64},
    }
    path = home / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run_cli("run", str(path), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    store = ResultsStore(f"sqlite:///{home / 'results.db'}", read_only=True)
    trials = store.trials("data-driven")
    store.close()
    return home, done, trials


def by_method(trials, task: str) -> dict:
    return {t.method: t for t in trials if t.task == task}


def test_every_trial_finishes_with_its_costs(sweep):
    _, _, trials = sweep
    assert len(trials) == 8 and {t.status for t in trials} == {TrialStatus.COMPLETED}
    people = by_method(trials, "people")
    for name, trial in people.items():
        if name in CALIBRATING:
            assert trial.calibration_seconds > 0, name
        else:
            assert trial.calibration_seconds == 0, name
    assert people["spt"].trainable_params <= 1000 + 2 * 32 + 2  # the budget and the head
    # Light-PEFT prunes a third of heads and FFN neurons: the model it reports is really smaller.
    light = people["light_peft"].final_metrics
    assert light["pruning/heads"] == pytest.approx(1 / 3, abs=0.13) and light["pruning/neurons"] == pytest.approx(1 / 3, abs=0.05)
    assert people["light_peft"].total_params < people["lora"].total_params
    assert people["peft_debias"].final_metrics["calibration/corpus_texts"] > 0


def test_bias_scores_of_each_trial_beside_the_untouched_model(sweep):
    _, _, trials = sweep
    people = by_method(trials, "people")
    bases = set()
    for name, trial in people.items():
        metrics = trial.final_metrics
        for score in LM_SCORES:
            assert f"bias/{score}" in metrics and f"bias_base/{score}" in metrics, (name, score)
        assert 0 <= metrics["bias/crows_pairs"] <= 100
        bases.add(tuple(metrics[f"bias_base/{score}"] for score in LM_SCORES))
    assert len(bases) == 1, "every trial scores the same untouched model on the same sample"
    full = people["full"].final_metrics
    assert full["bias/winobias_gap"] != full["bias_base/winobias_gap"]  # full tuning moved the shared backbone
    bbq = by_method(trials, "bbq")
    assert set(bbq) == {"lora", "full"}
    for trial in bbq.values():
        for score in BBQ_SCORES:
            # No base score: the untouched model's answers would come from the task's random new head.
            assert -1 <= trial.final_metrics[f"bias/{score}"] <= 1 and f"bias_base/{score}" not in trial.final_metrics
        assert "bias/crows_pairs" not in trial.final_metrics


def test_results_and_mlflow_carry_costs_and_bias(sweep):
    home, done, trials = sweep
    assert "Leaderboard" in done.stdout
    store = ResultsStore(f"sqlite:///{home / 'results.db'}", read_only=True)
    console = Console(width=400, record=True)
    console.print(leaderboard_table(store.leaderboard("data-driven")))
    store.close()
    text = console.export_text()
    header = next(line for line in text.splitlines() if "┃ task" in line)
    for column in ("calibration", "pruned heads/neurons", "crows_pairs", "winobias_gap", "bbq_bias_ambiguous"):
        assert column in header, column
    lora = next(line for line in text.splitlines() if " people " in line and " lora " in line)
    base = next(t for t in trials if t.method == "lora" and t.task == "people").final_metrics
    assert f"{base['bias/crows_pairs']:.3g} ({base['bias_base/crows_pairs']:.3g})" in lora
    shown = invoke("results", "data-driven", "--format", "json", home=home)
    assert shown.returncode == 0, shown.stderr
    rows = {(r["task"], r["method"]): r for r in json.loads(shown.stdout)["leaderboard"]}
    stored = {(t.task, t.method): t for t in trials}
    for key, row in rows.items():
        assert row["calibration_seconds"] == pytest.approx(stored[key].calibration_seconds)
        assert row["figures"]["bias/" + ("crows_pairs" if key[0] == "people" else "bbq_bias_ambiguous")] == \
            stored[key].final_metrics["bias/" + ("crows_pairs" if key[0] == "people" else "bbq_bias_ambiguous")]
    client, runs = mlflow_runs(home, "data-driven")
    for trial in trials:
        run = runs[trial.trial_id]
        name = "bias/crows_pairs" if trial.task == "people" else "bias/bbq_bias_disambiguated"
        assert run.data.metrics[name] == pytest.approx(trial.final_metrics[name])
        assert len(client.get_metric_history(run.info.run_id, name)) == 1  # logged once
        assert run.data.metrics["final/calibration_seconds"] == pytest.approx(trial.calibration_seconds)
        assert run.data.metrics[f"final/{name}"] == pytest.approx(trial.final_metrics[name])
