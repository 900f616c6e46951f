"""Cluster submission: a sweep's spec travels to a Ray cluster as a Ray Job whose driver runs
`peftlab run` there; list, follow and stop those jobs, all through Ray's JobSubmissionClient."""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobSubmissionClient, JobType

from peftlab import settings
from peftlab.driver import check_ray_reachable
from peftlab.errors import UserError
from peftlab.spec import ExperimentSpec

PROBE_TIMEOUT_S = 5.0
"""How long each check before Ray's client (TCP connect, then one HTTP request) may take; Ray's
client itself sets no timeout and would hang on a port that accepts but never answers."""

EXPERIMENT_KEY = "peftlab_experiment"
"""Job metadata key holding the experiment name, shown by `peftlab jobs`."""

AUTH_HELP = "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"

# Ray's SDK logs every package upload and socket close at INFO; the CLI prints its own lines.
QUIET_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging")


class Cluster:
    """The Jobs API of one Ray cluster, reached at its dashboard URL (http://HEAD:8265)."""

    def __init__(self, client: JobSubmissionClient, url: str) -> None:
        self.client = client
        self.url = url

    @classmethod
    def connect(cls, address: str | None = None) -> Cluster:
        """Check that the address answers as a Ray dashboard, then open Ray's client.

        A closed port, a wrong host, a port that is not the dashboard and a missing or wrong
        token each end in one UserError line, within about 2 * PROBE_TIMEOUT_S."""
        url = settings.ray_api_server(address)
        if not url:
            raise UserError(f"no Ray cluster given: pass --address http://HEAD:8265 or set {settings.ENV_RAY_API}")
        url = url.rstrip("/")
        host, port = _host_port(url)
        check_ray_reachable(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", timeout=PROBE_TIMEOUT_S)
        _check_is_dashboard(url)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # JobSubmissionClient lets $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS (a GCS address, as
        # `peftlab run` reads it), override its address argument; pin it so --address wins.
        with _pinned_env(settings.ENV_RAY_API, url), _answers(url):
            client = JobSubmissionClient(url)
        return cls(client, url)

    def submit(self, spec_path: Path, spec: ExperimentSpec, *, store_url: str | None = None,
               tracking_uri: str | None = None) -> str:
        """Send the spec file alone as the job's working_dir and run `peftlab run` on it there.

        The driver runs on the cluster: it writes to the store and tracking server given here or,
        without them, to the cluster's own settings. This shell's PEFTLAB_* and MLflow variables
        go along as the job's environment, which its trials inherit."""
        command = ["peftlab", "run", spec_path.name]
        if store_url:
            command += ["--store", store_url]
        if tracking_uri:
            command += ["--tracking-uri", tracking_uri]
        passed = {name: value for name, value in os.environ.items()
                  if value and (name.startswith("PEFTLAB_") or name == settings.ENV_TRACKING)}
        with tempfile.TemporaryDirectory(prefix="peftlab-submit-") as folder, _answers(self.url):
            shutil.copy(spec_path, Path(folder) / spec_path.name)
            runtime_env: dict = {"working_dir": folder}
            if passed:
                runtime_env["env_vars"] = passed
            return self.client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env,
                                          metadata={EXPERIMENT_KEY: spec.name})

    def jobs(self) -> list[JobDetails]:
        """Submitted jobs, oldest first; drivers started by hand have no logs here and are left out."""
        with _answers(self.url):
            found = self.client.list_jobs()
        return sorted((job for job in found if job.type == JobType.SUBMISSION), key=lambda job: job.start_time or 0)

    def info(self, job_id: str) -> JobDetails:
        with _answers(self.url):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        with _answers(self.url):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], object]) -> JobDetails:
        """Pass the job's output to `write` as it comes, until the job ends; return its final state."""

        async def pump() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        self.info(job_id)  # an unknown id fails here with Ray's answer, not as a websocket error
        with _answers(self.url):
            asyncio.run(pump())
        return self.wait(job_id)

    def stop(self, job_id: str) -> JobDetails:
        """Ask Ray to stop the job (SIGTERM to its driver, SIGKILL after Ray's grace period) and
        wait until it has; a job that already ended is left as it is."""
        with _answers(self.url):
            self.client.stop_job(job_id)
        return self.wait(job_id)

    def wait(self, job_id: str, poll_s: float = 0.5) -> JobDetails:
        """Block until the job is in a terminal state (its log stream can close a moment earlier)."""
        while not (job := self.info(job_id)).status.is_terminal():
            time.sleep(poll_s)
        return job


def message(job: JobDetails) -> str:
    """The first line of Ray's message about a job; a failed job's message goes on with its last logs."""
    return (job.message or "").strip().split("\n", 1)[0]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise UserError(f"cannot use Ray dashboard address '{url}': expected http://HOST:PORT")
    return parts.hostname, port


def _check_is_dashboard(url: str) -> None:
    """A port can answer without being Ray's dashboard (the GCS port, another service): ask the
    one endpoint a Ray dashboard serves without a token."""
    try:
        answer = requests.get(f"{url}/api/authentication_mode", timeout=PROBE_TIMEOUT_S)
        is_dashboard = answer.ok and "authentication_mode" in answer.json()
    except (requests.RequestException, ValueError):
        is_dashboard = False
    if not is_dashboard:
        raise UserError(f"{url} answers, but not as a Ray dashboard: pass the dashboard's URL (http://HEAD:8265)")


@contextmanager
def _pinned_env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def _answers(url: str) -> Iterator[None]:
    """Ray's client raises multi-line errors carrying the server's text; keep the first line."""
    try:
        yield
    except AuthenticationError as exc:
        raise UserError(f"Ray at {url} refused this client ({_first_line(exc)}): {AUTH_HELP}") from None
    except (RuntimeError, ConnectionError, requests.RequestException, aiohttp.ClientError) as exc:
        raise UserError(f"Ray at {url}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
