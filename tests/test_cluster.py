"""Cluster submission on a real two-node Ray cluster started on this machine, token
authentication on: `peftlab submit`, `jobs`, `logs` and `stop` run as a user runs them.

The nodes listen on loopback addresses only and are stopped by process id, never with
`ray stop`, which would stop every Ray process on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from peftlab.store import ResultsStore, TrialStatus
from peftlab.workers.checkpoint import OWNER_FILE
from test_mlflow_server import mlflow_server  # noqa: F401 - a real tracking server, as a cluster has

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PEFTLAB = str(BIN / "peftlab")
RAY = str(BIN / "ray")
OUTSIDE = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "PEFTLAB_HOME")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class RayCluster:
    url: str                # the dashboard, where the Jobs API answers
    gcs_port: int
    env: dict[str, str]     # a submitter's environment: token mode on, the cluster's token
    node_ids: frozenset[str]
    homes: tuple[Path, ...]  # each node's own PEFTLAB_HOME, as on machines with no shared disk


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def peftlab(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PEFTLAB, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def both_nodes(url: str, env: dict[str, str]) -> set[str] | None:
    """The ids of the two live nodes, from Ray's state API; None until both have joined."""
    listed = subprocess.run([RAY, "list", "nodes", "--address", url, "--format", "json"], check=False, env=env,
                            capture_output=True, text=True, timeout=60)
    if listed.returncode != 0 or not listed.stdout.lstrip().startswith("["):
        return None  # before any node registers, Ray prints "No resource in the cluster", not JSON
    alive = {node["node_id"] for node in json.loads(listed.stdout) if node["state"] == "ALIVE"}
    return alive if len(alive) == 2 else None


def wait_for(what: str, check, nodes: list[subprocess.Popen], limit_s: float = 90):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            pytest.fail(f"a Ray node exited while waiting for {what}")
        if found := check():
            return found
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM makes each `ray start --block` stop its own node; what is left of their process
    trees (workers, job drivers) is then killed by pid."""
    tree = []
    for node in nodes:
        try:
            tree += psutil.Process(node.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for node in reversed(nodes):  # the worker node first, the head last
        node.terminate()
    for node in nodes:
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for process in alive:
        process.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[RayCluster]:
    """A head and a worker node with one CPU each; Ray's own token authentication is on."""
    env = {name: value for name, value in os.environ.items() if name not in OUTSIDE}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    logs = tmp_path_factory.mktemp("ray-nodes")
    gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
    common = ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    # Ray replaces 127.0.0.1 with the machine's outward address; other loopback addresses stay as
    # given, and two of them make the nodes look like two machines. Every port is chosen here so
    # that nothing clashes with another Ray instance on this machine.
    head = ["--head", "--node-ip-address=127.0.0.2", f"--port={gcs}", f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={head_agent}"]
    worker = [f"--address=127.0.0.2:{gcs}", "--node-ip-address=127.0.0.3", f"--dashboard-agent-listen-port={worker_agent}"]
    url = f"http://127.0.0.1:{dashboard}"
    nodes: list[subprocess.Popen] = []
    temp_dirs: list[str] = []
    homes = (logs / "head-home", logs / "worker-home")
    try:
        for name, args in (("head", head), ("worker", worker)):
            with open(logs / f"{name}.log", "w") as log:
                # Each node its own temp dir, as on separate machines: each unpacks a job's
                # working_dir there, and a shared one would be unpacked twice, under a running
                # driver. Short paths: Ray puts unix sockets there (~107 characters at most).
                temp_dirs.append(tempfile.mkdtemp(prefix=f"peftlab-ray-{name}-", dir="/tmp"))
                node_env = {**env, "PEFTLAB_HOME": str(homes[len(nodes)])}
                nodes.append(subprocess.Popen([RAY, "start", *args, *common, f"--temp-dir={temp_dirs[-1]}"],
                                              env=node_env, stdout=log, stderr=subprocess.STDOUT))
            if name == "head":
                wait_for("the dashboard", lambda: serves(f"{url}/api/authentication_mode"), nodes)
        node_ids = wait_for("two live nodes", lambda: both_nodes(url, env), nodes)
        yield RayCluster(url, gcs, env, frozenset(node_ids), homes)
    finally:
        stop_nodes(nodes)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def serves(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def write_spec(folder: Path, name: str, tiny_bert_dir: Path, sentiment_csv: Path, *, methods: dict, max_steps: int) -> Path:
    spec = {
        "name": name,
        "model": str(tiny_bert_dir),
        "tasks": [{"dataset": str(sentiment_csv), "domain": "test/sentiment", "max_eval_samples": 60}],
        "methods": methods,
        "search": {"algorithm": "grid", "scheduler": "fifo", "metric": "validation/accuracy", "mode": "max",
                   "max_concurrent": 2},
        "training": {"max_steps": max_steps, "eval_every": 5, "batch_size": 16, "seeds": [0]},
        "resources": {"cpus_per_trial": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def checkpointed(ray_storage: Path, experiment: str) -> set[str]:
    """Trial ids that left a checkpoint under this Ray storage, read from the owner records."""
    owners = (json.loads(p.read_text()) for p in ray_storage.rglob(OWNER_FILE))
    return {owner["trial_id"] for owner in owners if owner["experiment"] == experiment}


def test_unreachable_address_fails_in_seconds_with_one_line(tmp_path):
    (closed,) = free_ports(1)
    env = {name: value for name, value in os.environ.items() if name not in OUTSIDE}
    # The 10 s limit is the requirement itself: Ray's own client would retry for much longer.
    done = peftlab("submit", str(ROOT / "examples" / "quickstart.yaml"), "--address", f"http://127.0.0.1:{closed}",
                   env=env, timeout=10)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [f"error: cannot reach Ray at 127.0.0.1:{closed}: Connection refused"]
    assert done.stdout == ""


def test_submit_runs_every_trial_once_across_both_nodes(cluster, tmp_path, tiny_bert_dir, sentiment_csv):
    spec = write_spec(tmp_path, "cluster-sweep", tiny_bert_dir, sentiment_csv, max_steps=10,
                      methods={"lora": {"r": [2, 4], "lr": 1.0e-3}, "bitfit": {"lr": [1.0e-3, 1.0e-2]}})
    # The store and MLflow are files on this machine, so the job's driver (on the head) can write them.
    store_url = f"sqlite:///{tmp_path / 'results.db'}"
    # A Ray storage folder that both nodes mount at one path, as an NFS share would be.
    shared = tmp_path / "shared-ray"
    env = {**cluster.env, "PEFTLAB_HOME": str(tmp_path / "runs"), "PEFTLAB_RAY_STORAGE": str(shared)}

    done = peftlab("submit", str(spec), "--address", cluster.url, "--store", store_url,
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env=env, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "Leaderboard" in done.stdout and f"{job_id}: SUCCEEDED" in done.stdout

    trials = ResultsStore(store_url).trials("cluster-sweep")
    assert len(trials) == 4 and len({t.trial_id for t in trials}) == 4
    assert {t.status for t in trials} == {TrialStatus.COMPLETED}
    assert {t.node for t in trials} == cluster.node_ids  # both nodes ran trials
    assert (tmp_path / "runs" / "adapters").is_dir()  # PEFTLAB_HOME travelled with the job
    # With shared storage trials on every node checkpoint (at step 5 of 10), not only the driver's.
    assert checkpointed(shared, "cluster-sweep") == {t.trial_id for t in trials}
    assert not (tmp_path / "runs" / "ray").exists()

    # The address from Ray's own variable; a RAY_ADDRESS meant for `peftlab run` does not interfere.
    listed = peftlab("jobs", env={**cluster.env, "RAY_API_SERVER_ADDRESS": cluster.url, "RAY_ADDRESS": "127.0.0.1:1"})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and "cluster-sweep" in row

    # --address wins over the variable.
    logs = peftlab("logs", job_id, "--address", cluster.url, env={**cluster.env, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"})
    assert logs.returncode == 0, logs.stderr
    assert "Leaderboard" in logs.stdout


def test_trials_on_nodes_without_a_shared_disk_upload_their_adapters(cluster, mlflow_server, tmp_path, tiny_bert_dir,
                                                                      sentiment_csv):
    from mlflow.tracking import MlflowClient

    name = "no-shared-disk"
    spec = write_spec(tmp_path, name, tiny_bert_dir, sentiment_csv, max_steps=10,
                      methods={"lora": {"r": [2, 4], "lr": 1.0e-3}, "bitfit": {"lr": [1.0e-3, 1.0e-2]}})
    # No PEFTLAB_HOME goes with the job: the driver (on the head) and each trial use their node's own.
    store_url = f"sqlite:///{tmp_path / 'results.db'}"
    done = peftlab("submit", str(spec), "--address", cluster.url, "--store", store_url,
                   "--tracking-uri", mlflow_server, env=cluster.env, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr

    trials = ResultsStore(store_url).trials(name)
    assert len(trials) == 4 and {t.status for t in trials} == {TrialStatus.COMPLETED}
    assert {t.node for t in trials} == cluster.node_ids
    holders = {t.trial_id: [home for home in cluster.homes if (home / "adapters" / name / t.trial_id).is_dir()]
               for t in trials}
    assert all(len(found) == 1 for found in holders.values()), holders  # on the node that trained it only
    assert {found[0] for found in holders.values()} == set(cluster.homes)
    # Without shared storage only trials on the driver's node (the head) can checkpoint.
    head, worker = cluster.homes
    on_head = {trial_id for trial_id, found in holders.items() if found == [head]}
    assert checkpointed(head / "ray", name) == on_head and not (worker / "ray").exists()

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    by_trial = {run.data.tags["peftlab.trial_id"]: run for run in runs}
    assert set(by_trial) == {t.trial_id for t in trials}
    for trial in trials:
        local = Path(client.download_artifacts(by_trial[trial.trial_id].info.run_id, "adapter",
                                               str(tmp_path / trial.trial_id)))
        assert sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) == trial.adapter_bytes


def test_wrong_port_wrong_job_and_missing_token_each_give_one_line(cluster):
    def one_error_line(done: subprocess.CompletedProcess) -> str:
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        return lines[0]

    gcs_port = one_error_line(peftlab("jobs", "--address", f"http://127.0.0.1:{cluster.gcs_port}", env=cluster.env))
    assert "answers, but not as a Ray dashboard" in gcs_port

    unknown = one_error_line(peftlab("logs", "raysubmit_nosuchjob", "--address", cluster.url, env=cluster.env))
    assert "raysubmit_nosuchjob" in unknown

    no_token = {name: value for name, value in cluster.env.items() if not name.startswith("RAY_AUTH_")}
    refused = one_error_line(peftlab("jobs", "--address", cluster.url, env=no_token))
    assert "Missing authentication token" in refused and "RAY_AUTH_MODE=token" in refused

    wrong_token = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = one_error_line(peftlab("jobs", "--address", cluster.url, env=wrong_token))
    assert "Invalid authentication token" in refused


def test_stop_ends_a_running_sweep(cluster, tmp_path, tiny_bert_dir, sentiment_csv):
    spec = write_spec(tmp_path, "cluster-long", tiny_bert_dir, sentiment_csv, max_steps=100_000,
                      methods={"lora": {"r": [2], "lr": 1.0e-3}})
    env = {**cluster.env, "PEFTLAB_HOME": str(tmp_path / "runs")}
    submitted = peftlab("submit", str(spec), "--address", cluster.url, "--store", f"sqlite:///{tmp_path / 'results.db'}",
                        "--no-wait", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    def running() -> bool:
        listed = peftlab("jobs", "--address", cluster.url, env=env)
        return any(job_id in line and "RUNNING" in line for line in listed.stdout.splitlines())

    wait_for(f"{job_id} to run", running, [])
    stopped = peftlab("stop", job_id, "--address", cluster.url, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id}: STOPPED"
