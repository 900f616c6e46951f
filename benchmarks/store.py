"""Results store under concurrent writers: 8 processes upserting trial rows and metric points
into one store, SQLite and PostgreSQL side by side; rows/s, points/s and errors per backend.

Each writer owns its own trials (as trials do) and loops: upsert the row, add four metric points
at the next step, upsert again; every error is counted, none is retried here.

    python benchmarks/store.py               # 8 writers, 60 s per backend
    python benchmarks/store.py --smoke       # 2 writers, 5 s
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def writer(url: str, experiment: str, index: int, seconds: float, queue) -> None:
    from peftlab.store import ResultsStore, TrialRecord, TrialStatus

    store = ResultsStore(url, migrate=False)
    rows = points = errors = 0
    first_error = ""
    step, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        trial_id = f"w{index}-{step // 20}"  # a new trial every 20 steps
        step += 1
        record = TrialRecord(trial_id=trial_id, experiment=experiment, task="sst2", dataset="sst2", model="minilm",
                             method="lora", seed=index, hparams={"r": 8, "lr": 1e-3}, status=TrialStatus.RUNNING,
                             started_at=datetime.now(timezone.utc), objective=0.5 + step % 7 / 100, steps=step)
        try:
            store.upsert_trial(record)
            store.add_metrics(experiment, trial_id, step, {"train/loss": 1 / step, "validation/accuracy": 0.5, "validation/loss": 0.7,
                                               "validation/macro_f1": 0.5})
            store.upsert_trial(record)
            rows, points = rows + 2, points + 4
        except Exception as exc:  # counted: the figure is how many there are
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    store.close()
    queue.put((rows, points, errors, first_error))


def measure(url: str, writers: int, seconds: float) -> dict:
    from peftlab.store import ResultsStore

    store = ResultsStore(url)  # migrated once, before the writers start
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    store.create_experiment(experiment, {"name": experiment}, "h", "validation/accuracy", "max", "bench", {})
    store.close()
    queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=writer, args=(url, experiment, i, seconds, queue))
             for i in range(writers)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - started
    rows, points, errors = (sum(r[i] for r in results) for i in range(3))
    return {"rows_per_s": rows / seconds, "points_per_s": points / seconds, "errors": errors,
            "first_error": next((r[3] for r in results if r[3]), ""), "elapsed": elapsed}


def postgres_database():
    import psycopg
    from psycopg import sql

    name = f"peftlab_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--smoke", action="store_true", help="2 writers, 5 s")
    args = parser.parse_args()
    writers, seconds = (2, 5.0) if args.smoke else (args.writers, args.seconds)
    print(f"{writers} writer processes, {seconds:.0f} s per backend; each loop: upsert, 4 metric points, upsert")
    print(f"{'backend':<12} {'rows/s':>9} {'points/s':>10} {'errors':>7}")
    with tempfile.TemporaryDirectory() as folder:
        backends = {"sqlite": f"sqlite:///{Path(folder) / 'results.db'}"}
        admin = None
        try:
            admin, name = postgres_database()
            backends["postgresql"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        except Exception as exc:
            print(f"postgresql   skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        try:
            for backend, url in backends.items():
                result = measure(url, writers, seconds)
                print(f"{backend:<12} {result['rows_per_s']:>9.0f} {result['points_per_s']:>10.0f} "
                      f"{result['errors']:>7}" + (f"  first: {result['first_error']}" if result["errors"] else ""),
                      flush=True)
        finally:
            if admin is not None:
                from psycopg import sql

                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                admin.close()


if __name__ == "__main__":
    main()
