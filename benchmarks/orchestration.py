"""Orchestration overhead: the same N short LoRA trials run by `run_sweep` and by a bare Tuner.

Both start Ray and run `run_trial`; the difference is peftlab's driver, store, MLflow and progress.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

# Set before Ray starts, so trial workers inherit them; RAY_AIR_NEW_OUTPUT=0 is what run_sweep
# sets, so that both sides use the same Tune reporter.
for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "RAY_AIR_NEW_OUTPUT": "0"}.items():
    os.environ.setdefault(name, value)
for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
    os.environ.pop(name, None)  # everything peftlab writes goes under the temporary PEFTLAB_HOME

def build_spec(model: Path, data: Path, trials: int, steps: int, concurrency: int):
    from peftlab.spec import parse_spec

    return parse_spec({
        "name": "orchestration-bench", "model": str(model),
        "tasks": [{"dataset": str(data)}],
        "methods": {"lora": {"r": 8, "alpha": 16, "lr": 1e-3}},  # fixed: every trial gets the same config
        "search": {"algorithm": "random", "num_samples": trials, "scheduler": "fifo", "max_concurrent": concurrency},
        "training": {"max_steps": steps, "eval_every": max(1, steps // 3), "batch_size": 16, "max_length": 32},
        "resources": {"cpus_per_trial": 1},
    })


def run_peftlab(spec, workdir: Path) -> float:
    """What a user pays for `peftlab run`: preflight, Ray start, store and MLflow setup, the sweep, recording."""
    import ray

    from peftlab.driver import run_sweep

    os.environ["PEFTLAB_HOME"] = str(workdir)  # a fresh store, MLflow database and Ray storage
    started = time.perf_counter()
    outcome = run_sweep(spec)
    elapsed = time.perf_counter() - started
    ray.shutdown()
    if outcome.counts.get("COMPLETED") != spec.search.num_samples:
        raise SystemExit(f"peftlab run did not complete every trial: {outcome.counts}")
    return elapsed


def run_bare(spec, workdir: Path) -> float:
    """The same trainable, configs, resources and FIFO scheduling, with no recording at all."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from peftlab import settings
    from peftlab.driver import init_ray
    from peftlab.search import plan
    from peftlab.workers.trial import TrialContext, run_trial

    started = time.perf_counter()
    init_ray(None)  # the same local instance peftlab starts; with_parameters needs it running
    task_plan = plan(spec)[0]
    data_dir = settings.data_dir()
    context = TrialContext(
        experiment=spec.name, model=spec.model, task=task_plan.task, training=spec.training,
        adapters_dir=str(workdir / "adapters"), data_dir=str(data_dir) if data_dir else None,
        cpus=spec.resources.cpus_per_trial, gpus=spec.resources.gpus_per_trial,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=task_plan.configs[0],  # the configs are identical (fixed hyperparameters, one seed)
        tune_config=tune.TuneConfig(num_samples=task_plan.num_trials, scheduler=FIFOScheduler(),
                                    max_concurrent_trials=spec.search.max_concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name="bare", storage_path=str(workdir / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    elapsed = time.perf_counter() - started
    ray.shutdown()
    if results.num_errors:
        raise SystemExit(f"bare Tune: {results.num_errors} trials failed")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep")
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial (3 evaluations)")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs; the order alternates")
    parser.add_argument("--smoke", action="store_true", help="2 trials x 10 steps, once: under a minute")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.steps, args.repeats = 2, 10, 1
    load = os.getloadavg()[0]  # other work on the machine shows up as noise in both columns

    import ray

    from peftlab.workers.synthetic import save_tiny_bert, write_sentiment_csv

    root = Path(tempfile.mkdtemp(prefix="peftlab-bench-"))
    save_tiny_bert(root / "tiny-bert")
    write_sentiment_csv(root / "data.csv")
    # Both sides start (and stop) their own local Ray instance, as a user's script would.
    concurrency = os.cpu_count() or 1
    spec = build_spec(root / "tiny-bert", root / "data.csv", args.trials, args.steps, concurrency)

    rows = []
    for r in range(args.repeats):
        # Alternate who goes first, so warm caches and page cache favour neither side.
        order = ["peftlab", "bare"] if r % 2 == 0 else ["bare", "peftlab"]
        times = {}
        for who in order:
            run = run_peftlab if who == "peftlab" else run_bare
            times[who] = run(spec, root / f"{who}-{r}")
        rows.append((f"{r + 1} ({order[0]} first)", times["peftlab"], times["bare"]))
    if len(rows) > 1:
        peftlab_times, bare_times = [p for _, p, _ in rows], [b for _, _, b in rows]
        rows.append(("mean", sum(peftlab_times) / len(peftlab_times), sum(bare_times) / len(bare_times)))
        rows.append(("best (min of each)", min(peftlab_times), min(bare_times)))  # least disturbed by other load

    print(f"\n{args.trials} lora trials x {args.steps} steps, {concurrency} at once, tiny BERT, FIFO; "
          f"Ray {ray.__version__}; load average at start {load:.2f}")
    print(f"{'repeat':<22}{'peftlab s':>11}{'bare Tune s':>13}{'ratio':>8}{'overhead s/trial':>18}")
    for label, peftlab_s, bare_s in rows:
        per_trial = (peftlab_s - bare_s) / args.trials
        print(f"{label:<22}{peftlab_s:>11.2f}{bare_s:>13.2f}{peftlab_s / bare_s:>8.3f}{per_trial:>18.2f}")
    print("goal: ratio <= 1.05")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
