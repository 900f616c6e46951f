"""Faults with real processes and real signals: the driver, with the Ray instance it started, killed
(SIGKILL) just after a trial finished, then `peftlab resume`. Every planned trial ends up in the store
exactly once, the finished one is not run again, and no metric step is stored or logged twice."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import time

import pytest
import yaml

from peftlab.store import ResultsStore, TrialStatus
from test_sweep import PEFTLAB, ROOT, mlflow_runs, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_killed_driver_resumes_exactly_once(tmp_path, tiny_bert_dir, sentiment_csv):
    spec = {
        "name": "killed", "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 40}],
        "methods": {"lora": {"r": [2, 4], "lr": [1.0e-3, 3.0e-3]}},
        "search": {"algorithm": "grid", "scheduler": "fifo", "max_concurrent": 1},
        "training": {"max_steps": 60, "eval_every": 20, "log_every": 10, "batch_size": 8},
    }
    spec_path = tmp_path / "killed.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "runs"
    env = {**os.environ, "PEFTLAB_HOME": str(home)}
    for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    # Its own session: the kill takes the driver and the local Ray it started, as a lost host would.
    proc = subprocess.Popen([*PEFTLAB, "run", str(spec_path)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = home / "results.db"
    deadline, finished = time.monotonic() + 400, []
    while time.monotonic() < deadline and proc.poll() is None and not finished:
        if db.exists():
            finished = [t for t in ResultsStore(f"sqlite:///{db}", migrate=False).trials("killed")
                        if t.status is TrialStatus.COMPLETED]
        time.sleep(0.2)
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    store = ResultsStore(f"sqlite:///{db}")
    before = {t.trial_id: t for t in store.trials("killed")}

    done = run_cli("resume", "killed", home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {t.trial_id: t for t in store.trials("killed")}
    assert len(after) == 4 and set(before) <= set(after)
    assert sorted((t.hparams["r"], t.hparams["lr"]) for t in after.values()) == [
        (2, 1e-3), (2, 3e-3), (4, 1e-3), (4, 3e-3)]
    assert all(t.status is TrialStatus.COMPLETED for t in after.values()), [t.status for t in after.values()]
    for trial in finished:  # finished before the kill: not run again, not touched
        assert after[trial.trial_id].finished_at == trial.finished_at
        assert after[trial.trial_id].final_metrics == trial.final_metrics
    for trial_id in after:
        points = collections.Counter((step, name) for step, name, _ in store.metrics(trial_id))
        assert points and max(points.values()) == 1, points
        assert sorted({s for s, n in points if n == "train/loss"}) == [10, 20, 30, 40, 50, 60]

    client, runs = mlflow_runs(home, "killed")
    assert set(runs) == set(after)
    for run in runs.values():
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "eval/accuracy"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)) and steps, (key, steps)
