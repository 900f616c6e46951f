"""The evaluation protocol on real sweeps: the search sees validation only, and its rungs decide the
same on a busy or an idle machine. The same sweep runs twice, once one trial at a time with the
true test labels and once two at a time with the test labels permuted: every search decision
(configurations, rung stops, kept checkpoints, validation metrics) is identical, test differs."""
from __future__ import annotations

import random

import pandas as pd
import pytest
import yaml

from peftlab.store import ResultsStore, TrialStatus
from test_sweep import run_cli

pytestmark = pytest.mark.timeout(900)


def _sweep(tmp_path, name: str, model, train_csv, test_csv, concurrent: int) -> dict:
    spec = {
        "name": name,
        "model": str(model),
        "tasks": [{"name": "sentiment", "dataset": str(train_csv), "test_file": str(test_csv),
                   "max_eval_samples": 80, "retention": False}],
        "methods": {"lora": {"r": 4, "lr": [3e-4, 3e-3, 1e-2]}, "bitfit": {"lr": [1e-3, 1e-2]}},
        # The loss, not accuracy: a tiny model's accuracies tie early on, and ties go on together.
        "search": {"algorithm": "grid", "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                   "metric": "validation/loss", "max_concurrent": concurrent},
        "training": {"max_steps": 40, "eval_every": 10, "batch_size": 16, "seeds": [0], "checkpoint_every": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / name
    done = run_cli("run", str(path), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    store = ResultsStore(f"sqlite:///{home / 'results.db'}")
    out = {}
    for trial in store.trials(name):
        curve = store.metrics(name, trial.trial_id)
        key = (trial.method, tuple(sorted(trial.hparams.items())))
        out[key] = {
            "status": trial.status, "steps": trial.steps, "objective": trial.objective,
            "kept": trial.final_metrics["step"],
            "validation": [(s, n, v) for s, n, v in curve if n.startswith("validation/")],
            "test": {k: v for k, v in trial.final_metrics.items() if k.startswith("test/")},
        }
    store.close()
    return out


def test_search_decisions_ignore_test_labels_and_machine_load(tmp_path, tiny_bert_dir, sentiment_csv):
    frame = pd.read_csv(sentiment_csv)
    train, test = frame.iloc[:300], frame.iloc[300:]
    train_csv, test_csv, permuted_csv = tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "permuted.csv"
    train.to_csv(train_csv, index=False)
    test.to_csv(test_csv, index=False)
    labels = test["label"].tolist()
    random.Random(0).shuffle(labels)
    test.assign(label=labels).to_csv(permuted_csv, index=False)

    idle = _sweep(tmp_path, "one-at-a-time", tiny_bert_dir, train_csv, test_csv, concurrent=1)
    busy = _sweep(tmp_path, "two-at-a-time", tiny_bert_dir, train_csv, permuted_csv, concurrent=2)

    assert idle.keys() == busy.keys() and len(idle) == 5
    for key in idle:
        for field in ("status", "steps", "objective", "kept", "validation"):
            assert idle[key][field] == busy[key][field], (key, field)
    statuses = [trial["status"] for trial in idle.values()]
    # The rungs stopped some trials (within each method) and let others finish: both decisions show.
    assert TrialStatus.EARLY_STOPPED in statuses and TrialStatus.COMPLETED in statuses
    for trial in idle.values():
        assert trial["test"]  # stopped trials are tested too
    assert any(idle[key]["test"] != busy[key]["test"] for key in idle)  # only the test labels moved
