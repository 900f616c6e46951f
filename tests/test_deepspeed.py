"""Multi-worker trials: DeepSpeed workers under Ray Train, driven from Ray Tune, on a real local Ray.

The model is MiniLM with dropout switched off: each rank would draw its own dropout masks, and
without them a trial is a function of its seed and data order only, so a 2-worker run's adapter
can be held against the single-process run's. CPU only: DeepSpeed's CPU accelerator over gloo.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from peftlab.errors import SpecError
from peftlab.spec import load_spec, parse_spec
from peftlab.store import ResultsStore, TrialRecord, TrialStatus
from peftlab.workers.checkpoint import OWNER_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ADAPTER_RTOL = 1e-4
"""Largest relative difference, ||a - b|| / ||b|| per tensor, allowed between a 2-worker and the
single-process adapter: the same arithmetic, summed in another order across ranks (measured:
at most 1e-5, and 1.3e-5 absolute on weights up to 0.13)."""


@pytest.fixture(scope="module")
def minilm_without_dropout(tmp_path_factory) -> Path:
    from peftlab.workers.models import resolve_model

    source, path = Path(resolve_model("minilm")), tmp_path_factory.mktemp("minilm-no-dropout")
    for item in source.iterdir():
        (path / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").unlink()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # Two workers of one CPU each plus the Tune trial's token share; logical CPUs, not cores.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep(name: str, model: Path, data: Path, *, workers: int, deepspeed: dict | None = None,
          lr: list[float] | float = 5.0e-3, scheduler: str = "fifo", accumulation: int = 1, select: str = "best"):
    from peftlab.driver import run_sweep

    spec = parse_spec({
        "name": name,
        "model": str(model),
        "tasks": [{"dataset": str(data), "max_eval_samples": 64}],
        "methods": {"lora": {"r": 4, "dropout": 0.0, "lr": lr}},
        "search": {"algorithm": "grid", "scheduler": scheduler, "metric": "validation/loss", "mode": "min",
                   "max_concurrent": 1, "grace_period": 1},
        "training": {"max_steps": 20, "eval_every": 5, "log_every": 1, "batch_size": 16, "seeds": [0],
                     "gradient_accumulation_steps": accumulation, "select": select},
        "resources": {"cpus_per_trial": 1, "workers_per_trial": workers},
        "deepspeed": deepspeed or {},
    })
    run_sweep(spec)


def adapter(home: Path, experiment: str, trial_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(home / "adapters" / experiment / trial_id / "adapter_model.safetensors"))


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def train_losses(store: ResultsStore, trial: TrialRecord) -> list[float]:
    return [value for _, name, value in store.metrics(trial.experiment, trial.trial_id) if name == "train/loss"]


def kill_a_rank_once_checkpointed(home: Path, experiment: str, step: int, killed: list[int]) -> None:
    """SIGKILL one Ray Train worker (a rank) of the experiment's trial once it reported `step`."""
    def reached() -> bool:
        try:
            trials = ResultsStore(f"sqlite:///{home / 'results.db'}", read_only=True).trials(experiment)
        except Exception:  # noqa: BLE001 - not yet there, or mid-write: look again
            return False
        return any(t.status is TrialStatus.RUNNING and (t.steps or 0) >= step for t in trials)

    if not wait_for(reached, seconds=600):
        return
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] and process.info["cmdline"][0].startswith("ray::RayTrainWorker"):
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)
            return


def test_two_zero2_workers_train_like_one_process_across_a_killed_rank(local_ray, peftlab_home,
                                                                       minilm_without_dropout, sentiment_csv):
    from test_sweep import mlflow_runs

    sweep("single", minilm_without_dropout, sentiment_csv, workers=1)
    # Both paths run the same loop; the 2-worker one also cuts each worker's slice into 2 micro-batches.
    # One rank is killed after the evaluation at step 10: Tune retries the trial, and Ray Train hands
    # each rank its part of the last checkpoint (engine state, random states, data position).
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_rank_once_checkpointed, args=(peftlab_home, "zero2", 10, killed))
    killer.start()
    sweep("zero2", minilm_without_dropout, sentiment_csv, workers=2, deepspeed={"zero_stage": 2}, accumulation=2)
    killer.join()
    assert killed, "no rank was killed"

    store = ResultsStore(f"sqlite:///{peftlab_home / 'results.db'}")
    [single], [zero2] = store.trials("single"), store.trials("zero2")
    assert zero2.status is TrialStatus.COMPLETED, zero2.error
    assert zero2.steps == 20 and zero2.restarts == 1
    _, runs = mlflow_runs(peftlab_home, "zero2")
    assert int(runs[zero2.trial_id].data.tags["peftlab.resumed_from_step"]) in (10, 15)
    losses = train_losses(store, zero2)
    assert len(losses) == 20  # every step's loss (log_every: 1), from rank 0, each once
    assert losses[-1] < losses[0] - 0.2, losses  # it learns
    assert losses == pytest.approx(train_losses(store, single), abs=1e-5)

    # Rank 0 reports what the single-process loop reports, costs included.
    assert zero2.final_metrics.keys() == single.final_metrics.keys()
    assert zero2.final_metrics["validation/loss"] == pytest.approx(single.final_metrics["validation/loss"], abs=1e-5)
    assert zero2.trainable_params == single.trainable_params and zero2.total_params == single.total_params
    assert zero2.adapter_bytes > 0 and zero2.peak_memory_bytes > 0 and zero2.samples_per_second > 0

    # Same global batches in the same order, gradients averaged over the global batch.
    two, one = adapter(peftlab_home, "zero2", zero2.trial_id), adapter(peftlab_home, "single", single.trial_id)
    assert two.keys() == one.keys()
    assert max(((two[k] - one[k]).norm() / one[k].norm()).item() for k in one) <= ADAPTER_RTOL


def test_zero3_adapter_reloads_into_a_plain_model_nan_fails_and_asha_frees_the_workers(
        local_ray, peftlab_home, minilm_without_dropout, sentiment_csv):
    import ray
    from peft import PeftModel

    from peftlab.workers.tasks import task_kind

    # One trial at a time, in this order: a good one, run to the end; one whose loss overflows;
    # one that cannot learn, which its first rung stops (all its ranks stop together). A stopped
    # trial whose workers' placement group stayed behind would hold 2 of the 4 CPUs, and the
    # next trial would never start.
    # ZeRO-3 shards the weights `select: best` would keep, so these trials keep their last step.
    sweep("zero3", minilm_without_dropout, sentiment_csv, workers=2, deepspeed={"zero_stage": 3},
          lr=[5.0e-3, 1.0e30, 1.0e-9], scheduler="asha", select="last")

    store = ResultsStore(f"sqlite:///{peftlab_home / 'results.db'}")
    by_lr = {t.hparams["lr"]: t for t in store.trials("zero3")}
    trained, diverged, stopped = by_lr[5.0e-3], by_lr[1.0e30], by_lr[1.0e-9]
    assert trained.status is TrialStatus.COMPLETED and trained.steps == 20, trained.error
    assert diverged.status is TrialStatus.FAILED
    assert re.fullmatch(r"NonFiniteLoss: training loss became (nan|inf) at step \d+", diverged.error), diverged.error
    assert stopped.status is TrialStatus.EARLY_STOPPED and stopped.steps == 5
    assert wait_for(lambda: ray.available_resources().get("CPU") == 4), ray.available_resources()

    # Its last checkpoint (step 15) unites both ranks' parts: loop state and ZeRO-3 partition each.
    [signed] = [p.parent for p in (peftlab_home / "ray").rglob(OWNER_FILE)
                if json.loads(p.read_text())["trial_id"] == trained.trial_id]
    names = {p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file()}
    assert {f"trainable_state.rank{rank}.pt" for rank in (0, 1)} <= names
    assert {f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_{part}_states.pt"
            for rank in (0, 1) for part in ("model", "optim")} <= names

    # The adapter was saved from the gathered ZeRO-3 shards: a plain model with it scores the
    # eval set exactly as the trained, sharded model did.
    spec = parse_spec({"name": "reload", "model": str(minilm_without_dropout),
                       "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 64}], "methods": {"lora": {}}})
    kind = task_kind("text-classification")
    data = kind.load_data(spec.tasks[0], None)
    base, tokenizer = kind.load_model(str(minilm_without_dropout), data, None)
    task = kind.build_task(data, tokenizer, kind.head_modules(base), spec.tasks[0], spec.training, None)
    path = peftlab_home / "adapters" / "zero3" / trained.trial_id
    model = PeftModel.from_pretrained(base, str(path)).eval()
    metrics = task.evaluate(model, 64, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(trained.final_metrics["validation/loss"], abs=1e-5)
    assert metrics["accuracy"] == trained.final_metrics["validation/accuracy"]


@pytest.mark.parametrize("deepspeed, expected", [
    ({"zero_stage": 4}, "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
    ({"zero_stage": 2, "offload_params": True}, "deepspeed.offload_params: needs zero_stage: 3"),
    ({"gradient_accumulation_steps": 2}, "deepspeed: `deepspeed.gradient_accumulation_steps` is now "
                                         "`training.gradient_accumulation_steps`"),
    ({"bf16": True}, "deepspeed: `deepspeed.bf16` is now `training.precision: bf16`"),
])
def test_bad_deepspeed_block_is_one_line(tmp_path, deepspeed, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "ds", "tasks": [{"dataset": "sst2"}], "methods": {"lora": {}},
                                    "resources": {"workers_per_trial": 2}, "deepspeed": deepspeed}))
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert expected in message
