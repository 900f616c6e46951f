"""Faults with real processes and real signals on real sweeps: a trial's worker process SIGKILLed
(Tune retries the trial from its last checkpoint), and two seeded rounds that kill a random trial
worker, then the driver with the Ray instance it started, at random points, before `peftlab resume`.

After recovery every planned trial is in the store exactly once and finished, no trial finished
before the kill ran again, and every metric step is in the store and in MLflow once, none missing.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.store import ResultsStore, TrialRecord, TrialStatus
from test_sweep import PEFTLAB, ROOT, cli_env, mlflow_runs, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = 2
"""Rounds 0 and 1 draw both worker kill steps in use (50, 100), a driver killed with and without a
finished trial, and both early driver kills; further rounds repeated those draws."""
CHECK_EVERY_S = 0.1


def write_spec(folder: Path, name: str, tiny_bert_dir: Path, sentiment_csv: Path, *, methods: dict,
               search: dict, training: dict) -> Path:
    spec = {"name": name, "model": str(tiny_bert_dir),
            "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 40}],
            "methods": methods, "search": {"scheduler": "fifo", "max_concurrent": 2, **search},
            "training": {"batch_size": 8, "checkpoint_every": 1, **training}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(spec_path: Path, home: Path) -> subprocess.Popen:
    # Its own session: killing the group takes the driver and the local Ray it started, as a lost host would.
    return subprocess.Popen([*PEFTLAB, "run", str(spec_path)], cwd=ROOT, env=cli_env(home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def trial_workers(driver: subprocess.Popen) -> list[psutil.Process]:
    """The processes of the driver's running one-process trials (Tune's function trainables)."""
    try:
        below = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in below:
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::ImplicitFunc"):
                found.append(process)
        except psutil.Error:
            pass
    return found


def rows(home: Path, experiment: str) -> list[TrialRecord]:
    db = home / "results.db"
    if not db.exists():
        return []
    try:
        return ResultsStore(f"sqlite:///{db}", read_only=True).trials(experiment)
    except Exception:  # noqa: BLE001 - not yet migrated, or mid-write: look again
        return []


def wait_until(driver: subprocess.Popen, condition, limit_s: float = 400) -> bool:
    """Poll until condition() holds; False when the driver exited or the time ran out first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and driver.poll() is None:
        if condition():
            return True
        time.sleep(CHECK_EVERY_S)
    return False


def assert_each_step_once(home: Path, experiment: str, trials: list[TrialRecord], loss_steps: list[int]) -> None:
    store = ResultsStore(f"sqlite:///{home / 'results.db'}")
    for trial in trials:
        steps = sorted(step for step, name, _ in store.metrics(experiment, trial.trial_id) if name == "train/loss")
        assert steps == loss_steps, (trial.trial_id, steps)
    client, runs = mlflow_runs(home, experiment)
    assert set(runs) == {t.trial_id for t in trials}
    for run in runs.values():
        assert run.info.status == "FINISHED", run.info
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert history == loss_steps, (run.data.tags["peftlab.trial_id"], history)


def test_a_killed_trial_worker_retries_from_its_checkpoint(tmp_path, tiny_bert_dir, sentiment_csv):
    # Two trials of one configuration and seed run side by side; one's process is killed after its
    # second checkpoint. Its retry must end with the adapter of the one left alone.
    spec = write_spec(tmp_path, "retried", tiny_bert_dir, sentiment_csv,
                      methods={"lora": {"r": 4, "dropout": 0.1, "lr": 3.0e-3}},
                      search={"algorithm": "grid", "num_samples": 2, "max_failures": 1},
                      training={"max_steps": 1500, "eval_every": 300, "log_every": 100})
    home = tmp_path / "runs"
    driver = start(spec, home)
    try:
        # Both past their second checkpoint: whichever worker is killed has one to continue from.
        at_checkpoint = wait_until(driver, lambda: len(now := rows(home, "retried")) == 2 and all(
            t.status is TrialStatus.RUNNING and (t.steps or 0) >= 600 for t in now))
        assert at_checkpoint, "the trials did not both reach their second checkpoint while running"
        workers = trial_workers(driver)
        assert workers, "no trial worker process found"
        workers[0].send_signal(signal.SIGKILL)
        assert driver.wait(timeout=400) == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    trials = ResultsStore(f"sqlite:///{home / 'results.db'}").trials("retried")
    assert [t.status for t in trials] == [TrialStatus.COMPLETED] * 2, [(t.status, t.error) for t in trials]
    [retried] = [t for t in trials if t.restarts == 1]
    [untouched] = [t for t in trials if t.restarts == 0]
    _, runs = mlflow_runs(home, "retried")
    resumed_from = int(runs[retried.trial_id].data.tags["peftlab.resumed_from_step"])
    assert resumed_from in (600, 900, 1200)  # continued from a checkpoint, not from the start
    assert "peftlab.resumed_from_step" not in runs[untouched.trial_id].data.tags
    assert retried.final_metrics["validation/accuracy"] == untouched.final_metrics["validation/accuracy"]
    assert retried.objective == untouched.objective

    def adapter(trial: TrialRecord) -> dict[str, torch.Tensor]:
        return load_file(str(home / "adapters" / "retried" / trial.trial_id / "adapter_model.safetensors"))

    a, b = adapter(retried), adapter(untouched)
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert_each_step_once(home, "retried", trials, list(range(100, 1501, 100)))
    # Dropped checkpoints wait for a Tune state that no longer names them; the last state releases
    # them all, so each trial keeps only its newest.
    kept = sorted(folder.parent.name for folder in (home / "ray").glob("retried.*/*/checkpoint_*"))
    assert len(kept) == 2 and len(set(kept)) == 2, kept


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_random_kills_then_resume_leave_every_trial_once(round_, tmp_path, tiny_bert_dir, sentiment_csv):
    rng = random.Random(round_)
    worker_kill_step = rng.choice([50, 100, 150])
    finished_before_driver_kill = rng.randint(0, 1)
    driver_kill_step = rng.choice([25, 75, 125])
    name = f"round{round_}"
    spec = write_spec(tmp_path, name, tiny_bert_dir, sentiment_csv,
                      methods={"lora": {"r": [2, 4], "lr": 3.0e-3}},
                      search={"algorithm": "grid"}, training={"max_steps": 200, "eval_every": 50, "log_every": 25})
    home = tmp_path / "runs"
    driver = start(spec, home)
    kills = []
    try:
        if wait_until(driver, lambda: any(t.status is TrialStatus.RUNNING and (t.steps or 0) >= worker_kill_step
                                          for t in rows(home, name))):
            if workers := trial_workers(driver):
                rng.choice(workers).send_signal(signal.SIGKILL)
                kills.append("trial worker")

        def driver_kill_point() -> bool:
            now = rows(home, name)
            finished = [t for t in now if t.status is TrialStatus.COMPLETED]
            running = [t for t in now if t.status is TrialStatus.RUNNING and (t.steps or 0) >= driver_kill_step]
            return len(finished) >= finished_before_driver_kill and bool(running)

        if wait_until(driver, driver_kill_point):
            os.killpg(driver.pid, signal.SIGKILL)
            kills.append("driver")
        driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    print(f"round {round_}: killed {kills or 'nothing'}")
    before = {t.trial_id: t for t in rows(home, name)}

    if "driver" in kills:
        done = run_cli("resume", name, home=home)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = ResultsStore(f"sqlite:///{home / 'results.db'}").trials(name)
    assert sorted(t.hparams["r"] for t in after) == [2, 4]
    assert len({t.trial_id for t in after}) == 2
    assert [t.status for t in after] == [TrialStatus.COMPLETED] * 2, [(t.status, t.error) for t in after]
    for trial in after:  # finished before the kill: not run again, not touched
        if trial.trial_id in before and before[trial.trial_id].status is TrialStatus.COMPLETED:
            assert trial.finished_at == before[trial.trial_id].finished_at
            assert trial.final_metrics == before[trial.trial_id].final_metrics
    assert_each_step_once(home, name, after, list(range(25, 201, 25)))
