"""End-to-end sweeps through the real CLI, a real Ray instance, real MLflow and a real store.

One sweep runs a tiny BERT on generated data and is built so that ASHA must stop some trials
and one trial must diverge; another runs the quickstart spec in --smoke mode on MiniLM + SST-2.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.store import ResultsStore, TrialStatus

ROOT = Path(__file__).resolve().parent.parent
PEFTLAB = [sys.executable, "-m", "peftlab.cli"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def cli_env(home: Path) -> dict[str, str]:
    """A user's environment with PEFTLAB_HOME at `home` and no store, MLflow or Ray from outside."""
    env = {**os.environ, "PEFTLAB_HOME": str(home)}
    for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def run_cli(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, as a user runs it: for commands that start Ray (run, resume)."""
    return subprocess.run([*PEFTLAB, *args], cwd=ROOT, env=cli_env(home), capture_output=True, text=True,
                          timeout=timeout)


def invoke(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The CLI in this process (click's runner, the user's environment with PEFTLAB_HOME at `home`): for
    the commands that read a finished sweep (results, eval, predict, export), without paying for a new
    interpreter's imports at every call."""
    from typer.testing import CliRunner

    from peftlab.cli import app

    env = cli_env(home)
    unset = {name: None for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS") if name not in env}
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(app, list(args), env={**env, **unset})
    finally:
        os.chdir(previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def mlflow_runs(home: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([found.experiment_id])
    by_trial = {r.data.tags["peftlab.trial_id"]: r for r in runs}
    assert len(by_trial) == len(runs), "a trial has more than one MLflow run"
    return client, by_trial


def test_sweep_end_to_end(tmp_path, tiny_bert_dir, sentiment_csv):
    # Trials run one at a time in grid order, compared at rungs 25 and 50 across methods. The first
    # (full, lr 3e-3) learns the task and sets the rungs; near-zero learning rates keep the initial
    # loss, so they are stopped at one of them, yet tested and saved; the absurd learning rate
    # makes the loss overflow, which must fail that trial only.
    spec = {
        "name": "e2e",
        "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "domain": "test/sentiment", "max_eval_samples": 120}],
        "methods": {
            "full": {"lr": [3.0e-3, 1.0e-9, 1.0e+30]},
            "lora": {"r": [2], "lr": 1.0e-9},
            "bitfit": {"lr": 1.0e-2},
        },
        "search": {"algorithm": "grid", "scheduler": "asha", "metric": "validation/loss", "mode": "min",
                   "max_concurrent": 1, "grace_period": 1, "rung_groups": "all"},
        "training": {"max_steps": 75, "eval_every": 25, "batch_size": 16, "seeds": [0]},
    }
    spec_path = tmp_path / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "runs"

    done = run_cli("run", str(spec_path), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Leaderboard" in done.stdout
    # The diverged trial is one line with its reason and its log, not Tune's whole traceback.
    failed_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("failed"))
    assert "NonFiniteLoss: training loss became" in failed_line and "(log: " in failed_line
    assert "Traceback" not in done.stdout + done.stderr

    store = ResultsStore(f"sqlite:///{home / 'results.db'}")
    assert store.get_experiment("e2e").status.value == "COMPLETED"
    trials = store.trials("e2e")
    assert len(trials) == 5 and len({t.trial_id for t in trials}) == 5
    by_config = {(t.method, t.hparams.get("lr"), t.hparams.get("r")): t for t in trials}
    good = by_config[("full", 3.0e-3, None)]
    assert good.status is TrialStatus.COMPLETED and good.steps == 75
    assert "rungs at steps 25, 50 within each task" in done.stdout
    for key in [("full", 1.0e-9, None), ("lora", 1.0e-9, 2)]:
        stopped = by_config[key]
        assert stopped.status is TrialStatus.EARLY_STOPPED, (key, stopped.status, stopped.final_metrics)
        assert stopped.steps in (25, 50)
        # A stopped trial is tested on its kept checkpoint and keeps its adapter, like a finished one.
        assert {"test/loss", "test/accuracy", "validation/loss"} <= set(stopped.final_metrics)
        assert (home / "adapters" / "e2e" / stopped.trial_id).is_dir()
        assert stopped.objective == stopped.final_metrics["validation/loss"]
    diverged = by_config[("full", 1.0e+30, None)]
    assert diverged.status is TrialStatus.FAILED
    assert "training loss became" in diverged.error and "\n" not in diverged.error

    for trial in trials:
        assert set(trial.hparams) >= {"lr"} and trial.seed == 0
        if trial.method != "lora":
            assert "r" not in trial.hparams  # no foreign hyperparameters recorded
        assert trial.mlflow_run_id
    assert good.trainable_params == good.total_params > by_config[("lora", 1.0e-9, 2)].trainable_params
    assert good.adapter_bytes > 0 and good.peak_memory_bytes > 0 and good.train_seconds > 0
    assert good.samples_per_second > 0 and 0.0 <= good.final_metrics["validation/accuracy"] <= 1.0
    curve = store.metrics(good.experiment, good.trial_id)
    best_step, best_loss = min(((s, v) for s, n, v in curve if n == "validation/loss"), key=lambda point: point[1])
    # select: best (the default) keeps the best validation evaluation: its step, its numbers.
    assert good.objective == best_loss == good.final_metrics["validation/loss"]
    assert good.final_metrics["step"] == best_step
    assert [s for s, n, _ in curve if n == "test/accuracy"] == [75]  # tested once, at the end
    assert good.final_metrics["test/accuracy"] == next(v for s, n, v in curve if n == "test/accuracy")
    assert sorted({s for s, n, _ in store.metrics(good.experiment, good.trial_id) if n == "validation/accuracy"}) == [25, 50, 75]
    # The train loss every log_every (10) steps and at each evaluation, not only at evaluations.
    loss_steps = [10, 20, 25, 30, 40, 50, 60, 70, 75]
    assert [s for s, n, _ in store.metrics(good.experiment, good.trial_id) if n == "train/loss"] == loss_steps

    client, runs = mlflow_runs(home, "e2e")
    assert set(runs) == {t.trial_id for t in trials}
    lora_run = runs[by_config[("lora", 1.0e-9, 2)].trial_id]
    assert lora_run.data.params["r"] == "2" and lora_run.data.tags["peftlab.method"] == "lora"
    assert not {"r", "alpha"} & set(runs[good.trial_id].data.params)
    assert runs[diverged.trial_id].info.status == "FAILED"
    assert runs[good.trial_id].info.status == "FINISHED"
    history = client.get_metric_history(good.mlflow_run_id, "validation/accuracy")
    assert [m.step for m in history] == [25, 50, 75]
    assert sorted(m.step for m in client.get_metric_history(good.mlflow_run_id, "train/loss")) == loss_steps
    params = runs[good.trial_id].data.params
    assert {k: params[k] for k in ("training.precision", "training.gradient_accumulation_steps",
                                   "training.gradient_checkpointing", "model_dtype", "quantization")} == {
        "training.precision": "fp32", "training.gradient_accumulation_steps": "1",
        "training.gradient_checkpointing": "False", "model_dtype": "float32", "quantization": "none"}
    assert [a.path for a in client.list_artifacts(good.mlflow_run_id)] == ["adapter"]

    listed = invoke("results", "e2e", "--format", "json", home=home)
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    rows = document["leaderboard"]
    assert document["experiment"] == "e2e" and document["seeds"] == [] and document["ranks"] == []  # one seed
    assert {r["method"] for r in rows} == {"full", "lora", "bitfit"}
    full = next(r for r in rows if r["method"] == "full")
    assert full["trial_id"] == good.trial_id and full["status"] == "COMPLETED" and full["steps"] == good.steps
    assert full["objective"] == good.objective and full["test_objective"] == good.final_metrics["test/loss"]
    markdown = invoke("results", "e2e", "--format", "markdown", home=home)
    assert markdown.returncode == 0, markdown.stderr
    lines = markdown.stdout.splitlines()
    assert lines[0].startswith("| task | domain | method |") and lines[1].startswith("|---|") and len(lines) == 2 + len(rows)
    # The files of a saved adapter can go missing: eval and export then say so.
    shutil.rmtree(home / "adapters" / "e2e" / by_config[("lora", 1.0e-9, 2)].trial_id)
    assert_exports(home, tmp_path, good, tiny_bert_dir)
    assert_eval(home, tmp_path, good, sentiment_csv)
    assert_predict(home, tmp_path, good, sentiment_csv)


def assert_predict(home: Path, tmp_path: Path, good, sentiment_csv: Path) -> None:
    """`peftlab predict` labels the trial's own evaluation sentences as its evaluation scored them."""
    import pandas as pd

    from peftlab.workers.data import load_text_classification

    from peftlab.workers.data import SplitOptions

    data = load_text_classification(str(sentiment_csv), options=SplitOptions(max_eval_samples=120))
    rows = tmp_path / "to-label.csv"
    pd.DataFrame({"text": data.test_texts}).to_csv(rows, index=False)
    out = tmp_path / "predictions.csv"
    done = invoke("predict", "e2e", "--method", "full", "--file", str(rows), "--out", str(out), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    predicted = pd.read_csv(out)
    assert list(predicted.columns) == ["row", "text", "prediction", "probability"]
    assert predicted["row"].tolist() == list(range(1, len(data.test_texts) + 1))
    assert predicted["text"].tolist() == data.test_texts
    assert predicted["probability"].between(0.5, 1.0).all()  # two classes: the winner has at least half
    gold = [data.label_names[label] for label in data.test_labels]
    accuracy = (predicted["prediction"].astype(str) == pd.Series(gold).astype(str)).mean()
    assert accuracy == pytest.approx(good.final_metrics["test/accuracy"], abs=1e-9)

    blank, untitled = tmp_path / "blank.csv", tmp_path / "untitled.csv"
    blank.write_text("text\nfine\n\"  \"\n")
    untitled.write_text("sentence\nfine\n")
    refusals = {
        "out exists": (["--file", str(rows), "--out", str(out)], "already exists"),
        "no text column": (["--file", str(untitled), "--out", str(tmp_path / "p1.csv")],
                           "missing text column 'text' (available columns: sentence)"),
        "empty text": (["--file", str(blank), "--out", str(tmp_path / "p2.csv")], "data rows 2"),
    }
    for case, (args, expected) in refusals.items():
        refused = invoke("predict", "e2e", "--method", "full", *args, home=home)
        assert refused.returncode == 2 and expected in refused.stderr, (case, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, (case, refused.stderr)
    assert not (tmp_path / "p1.csv").exists() and not (tmp_path / "p2.csv").exists()


def eval_rows(stdout: str) -> dict[str, list[float]]:
    """`peftlab eval`'s table: metric -> its numbers (scored now, then recorded)."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0].startswith(("validation/", "test/")):
            found[cells[0]] = [float(c) for c in cells[1:] if c not in ("", "-")]
    return found


def assert_eval(home: Path, tmp_path: Path, good, sentiment_csv: Path) -> None:
    """`peftlab eval` reloads the saved adapter and reproduces the trial's recorded test metrics (and,
    with --split validation, those of the kept checkpoint)."""
    for chosen in (["--method", "full"], ["--trial", good.trial_id], ["--trial", good.trial_id, "--split", "validation"]):
        done = invoke("eval", "e2e", *chosen, home=home)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = eval_rows(done.stdout)
        split = chosen[-1] if "--split" in chosen else "test"
        assert {f"{split}/accuracy", f"{split}/loss"} == set(rows) - {f"{split}/macro_f1"}, done.stdout
        for metric, (now, recorded) in rows.items():
            assert now == recorded == pytest.approx(good.final_metrics[metric], abs=5e-7), metric
    rows = eval_rows(invoke("eval", "e2e", "--method", "full", home=home).stdout)
    # The same file named as another data set: same labels, same rows, same numbers.
    again = invoke("eval", "e2e", "--method", "full", "--dataset", str(sentiment_csv), home=home)
    assert again.returncode == 0, again.stderr
    assert {k: v[0] for k, v in eval_rows(again.stdout).items()} == {k: v[0] for k, v in rows.items()}
    other = tmp_path / "other-labels.csv"
    other.write_text("text,label\n" + "".join(f"sentence {i},{'xyz'[i % 3]}\n" for i in range(30)))
    refusals = {
        "other labels": (["--method", "full", "--dataset", str(other)], "the adapter was trained on"),
        "no such trial": (["--trial", "nope"], "has no trial 'nope'"),
        "nothing named": ([], "--trial ID or --method M"),
        "no adapter": (["--method", "lora"], "is not at"),
        "bad split": (["--method", "full", "--split", "train"], "--split must be validation or test"),
    }
    for case, (args, expected) in refusals.items():
        refused = invoke("eval", "e2e", *args, home=home)
        assert refused.returncode == 2 and expected in refused.stderr, (case, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, (case, refused.stderr)


def assert_exports(home: Path, tmp_path: Path, good, tiny_bert_dir: Path) -> None:
    """`peftlab export` of the e2e sweep: the adapter with its card, the merged model, the refusals."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.workers.methods import get_method

    out = tmp_path / "export" / "full"
    done = invoke("export", "e2e", "--method", "full", "--out", str(out), home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    source = home / "adapters" / "e2e" / good.trial_id
    assert {p.name for p in source.iterdir()} < {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert good.trial_id in card and f"{good.final_metrics['validation/loss']:.4f}" in card and "lr | 0.003" in card
    assert json.loads((out / "peftlab-export.json").read_text())["trial_id"] == good.trial_id

    merged = tmp_path / "export" / "full-merged"
    done = invoke("export", "e2e", "--method", "full", "--out", str(merged), "--merge", home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    # A plain transformers model, scoring as the trained adapter on its base does.
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    batch = tokenizer(["a fine and moving film", "dull, flat and far too long"], return_tensors="pt", padding=True)
    plain = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=plain.config.num_labels)
    adapted = get_method("full").load(base, source)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, adapted(**batch).logits, atol=1e-5)

    # One line, exit 2, nothing written, for each: the folder exists, an unknown or unfinished method,
    # a method whose adapter files are gone, --merge of a non-mergeable method.
    refusals = {
        "exists": (["--method", "full", "--out", str(out)], "already exists"),
        "unknown method": (["--method", "nope", "--out", str(tmp_path / "x1")], "unknown method 'nope'"),
        "method not run": (["--method", "dora", "--out", str(tmp_path / "x2")], "no finished trial of method 'dora'"),
        "no adapter": (["--method", "lora", "--out", str(tmp_path / "x3")], "is not at"),
        "not mergeable": (["--method", "houlsby", "--out", str(tmp_path / "x4"), "--merge"], "not mergeable"),
    }
    for case, (args, expected) in refusals.items():
        refused = invoke("export", "e2e", *args, home=home)
        assert refused.returncode == 2 and expected in refused.stderr, (case, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, (case, refused.stderr)
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 5))
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["full", "full-merged"]


@pytest.mark.postgres
def test_sweep_into_postgres_and_lora_adapter_loads_with_peft(tmp_path, tiny_bert_dir, sentiment_csv, postgres_url):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    spec = {
        "name": "adapter", "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 40}],
        "methods": {"lora": {"r": 4, "lr": 1.0e-3}},
        "search": {"num_samples": 1, "scheduler": "fifo"},
        "training": {"max_steps": 4, "eval_every": 4, "batch_size": 8},
    }
    spec_path = tmp_path / "adapter.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "runs"
    done = run_cli("run", str(spec_path), "--store", postgres_url, home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (home / "results.db").exists()
    (trial,) = ResultsStore(postgres_url).trials("adapter")
    assert trial.status is TrialStatus.COMPLETED and trial.adapter_bytes > 0
    adapter = home / "adapters" / "adapter" / trial.trial_id
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 2 * 2 * 4 * (32 + 32)


def test_quickstart_smoke_on_minilm_and_sst2(tmp_path, data_dir):
    home = tmp_path / "runs"
    done = run_cli("run", "examples/quickstart.yaml", "--smoke", home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    store = ResultsStore(f"sqlite:///{home / 'results.db'}")
    trials = store.trials("quickstart-sst2-minilm-smoke")
    assert sorted(t.method for t in trials) == ["bitfit", "dora", "full", "ia3", "lora"]
    assert all(t.status is TrialStatus.COMPLETED for t in trials), [(t.method, t.error) for t in trials]
    assert all(t.total_params > 22_000_000 for t in trials)  # the real MiniLM, not a tiny model
    _, runs = mlflow_runs(home, "quickstart-sst2-minilm-smoke")
    assert len(runs) == 5
    listed = invoke("results", "--format", "csv", home=home)
    assert listed.returncode == 0 and listed.stdout.count("\n") == 6, listed.stdout + listed.stderr
    assert {row["status"] for row in csv.DictReader(io.StringIO(listed.stdout))} == {"COMPLETED"}
    shown = invoke("results", home=home)
    assert "steps" in shown.stdout and "Across seeds" not in shown.stdout  # one seed: no seed table
    refused = invoke("results", "--format", "csv", "--table", "seeds", home=home)
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: experiment"), refused.stderr


def test_interrupted_sweep_resumes_without_duplicates(tmp_path, tiny_bert_dir, sentiment_csv):
    spec = {
        "name": "resume-me", "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 40}],
        "methods": {"lora": {"r": [2, 4], "lr": [1.0e-3, 3.0e-3]}},
        "search": {"algorithm": "grid", "scheduler": "fifo", "max_concurrent": 1},
        "training": {"max_steps": 200, "eval_every": 50, "batch_size": 8},
    }
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "runs"
    env = {**os.environ, "PEFTLAB_HOME": str(home)}
    proc = subprocess.Popen([*PEFTLAB, "run", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = home / "results.db"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists() and any(t.status is TrialStatus.COMPLETED for t in ResultsStore(f"sqlite:///{db}").trials("resume-me")):
            break
        time.sleep(1)
    # SIGTERM, as docker, `timeout` and `peftlab stop` send it, interrupts like Ctrl-C (SIGINT).
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, out + err
    assert "peftlab resume resume-me" in err
    store = ResultsStore(f"sqlite:///{db}")
    assert store.get_experiment("resume-me").status.value == "INTERRUPTED"
    before = {t.trial_id: t.status for t in store.trials("resume-me")}
    assert 1 <= sum(s is TrialStatus.COMPLETED for s in before.values()) < 4
    assert TrialStatus.RUNNING not in before.values()  # cut-short trials wait as PENDING
    _, runs = mlflow_runs(home, "resume-me")
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]

    done = run_cli("resume", "resume-me", home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    # The restored display counts the trials finished before the interruption: 0 pending, 4 done.
    assert re.search(r"│\s*0\s*│\s*0\s*│\s*4\s*│\s*0\s*│\s*0\s*│\s*\d\.\d{4}\s+lora", done.stdout), done.stdout
    assert "Tuner.restore" not in done.stdout + done.stderr + err
    again = run_cli("resume", "resume-me", home=home)  # nothing left to run: still 4 done, none pending
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"│\s*0\s*│\s*0\s*│\s*4\s*│\s*0\s*│\s*0\s*│", again.stdout), again.stdout
    trials = store.trials("resume-me")
    assert len(trials) == 4 and all(t.status is TrialStatus.COMPLETED for t in trials)
    assert sorted((t.hparams["r"], t.hparams["lr"]) for t in trials) == [(2, 1e-3), (2, 3e-3), (4, 1e-3), (4, 3e-3)]
    assert set(before) <= {t.trial_id for t in trials}
    assert store.get_experiment("resume-me").status.value == "COMPLETED"
    _, runs = mlflow_runs(home, "resume-me")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
