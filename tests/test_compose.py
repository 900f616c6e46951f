"""The docker-compose stack as a real compose implementation reads it, and the image it builds.

No Docker engine runs where the tests do, so this checks what `docker-compose config`
resolves (services, volumes, GPUs, health ordering, secrets from the env file) and that every
command-line flag the services use exists in the installed Ray, MLflow and peftlab.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "dashboard"}
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN")


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    # Debian's docker-compose (what .ci/run installs) renders the configuration without an engine.
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (apt-get install --no-install-recommends docker-compose)")
    # Only the env file may supply the stack's variables, not the caller's shell.
    env = {k: v for k, v in os.environ.items() if k not in read_env(ENV_EXAMPLE)}
    return subprocess.run(["docker-compose", "-f", "docker-compose.yml", "--env-file", str(env_file), "config"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def config() -> dict:
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def command_flags(command: str | list[str]) -> set[str]:
    text = command if isinstance(command, str) else " ".join(command)
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))


def help_text(*args: str) -> str:
    executable = Path(sys.executable).with_name(args[0])
    done = subprocess.run([str(executable), *args[1:], "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_stack_has_its_five_services_on_one_image(config):
    services = config["services"]
    assert set(services) == SERVICES
    ours = {name: s["image"] for name, s in services.items() if name != "postgres"}
    assert set(ours.values()) == {read_env(ENV_EXAMPLE)["PEFTLAB_IMAGE"]}, ours
    assert all(s["build"]["context"] == str(ROOT) for name, s in services.items() if name != "postgres")


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(config):
    services = config["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"}, (name, dependency, rule)
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    assert set(services["ray-head"]["depends_on"]) == {"postgres", "mlflow"}
    assert set(services["ray-worker"]["depends_on"]) == {"ray-head"}
    assert set(services["dashboard"]["depends_on"]) == {"postgres"}


def test_workers_reserve_gpus_and_shared_memory_and_can_scale(config):
    worker = config["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["shm_size"] == "8gb"
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    assert "ports" not in worker, "a published port would clash between replicas"


def test_head_and_workers_share_one_volume_at_the_same_path(config):
    services = config["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["volumes"] == worker["volumes"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in head["volumes"]}
    home = head["environment"]["PEFTLAB_HOME"]
    assert mounts[home] in config["volumes"], "PEFTLAB_HOME must be a named volume"
    for node in (head, worker):
        assert node["environment"]["PEFTLAB_HOME"] == home
        assert node["environment"]["PEFTLAB_DATA_DIR"] in mounts


def test_ray_token_auth_is_on_for_head_and_workers(config):
    token = read_env(ENV_EXAMPLE)["RAY_AUTH_TOKEN"]
    for name in ("ray-head", "ray-worker"):
        environment = config["services"][name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token"
        assert environment["RAY_AUTH_TOKEN"] == token


def test_published_ports_bind_loopback_only(config):
    published = {name: s.get("ports", []) for name, s in config["services"].items()}
    assert published["ray-head"] == ["127.0.0.1:8265:8265/tcp"]
    assert published["mlflow"] == ["127.0.0.1:5000:5000/tcp"]
    assert published["dashboard"] == ["127.0.0.1:8501:8501/tcp"]
    assert published["postgres"] == [] and published["ray-worker"] == []


def test_secrets_come_from_the_env_file_only(tmp_path, config):
    text = (ROOT / "docker-compose.yml").read_text()
    example = read_env(ENV_EXAMPLE)
    for key in SECRETS:
        assert example[key] not in text, f"{key}'s value is written in docker-compose.yml"

    # Other values in the env file reach every service that needs them...
    other = {**example, "POSTGRES_PASSWORD": "pw4711", "RAY_AUTH_TOKEN": "tok4711"}
    env_file = tmp_path / "other.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in other.items()))
    done = compose_config(env_file)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw4711"
    assert services["mlflow"]["environment"]["PGPASSWORD"] == "pw4711"
    for name in ("ray-head", "dashboard"):
        assert ":pw4711@postgres:5432/" in services[name]["environment"]["PEFTLAB_STORE_URL"]
    assert services["ray-worker"]["environment"]["RAY_AUTH_TOKEN"] == "tok4711"

    # ...and without them the stack refuses to start rather than run with a default secret.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = compose_config(empty)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr or "RAY_AUTH_TOKEN" in refused.stderr, refused.stderr


def test_service_commands_use_only_flags_the_installed_tools_have(config):
    services = config["services"]
    ray_flags = command_flags(help_text("ray", "start"))
    for name in ("ray-head", "ray-worker"):
        used = command_flags(services[name]["command"])
        assert used <= ray_flags, f"{name}: unknown ray start flags {used - ray_flags}"
    assert "--head" in command_flags(services["ray-head"]["command"])
    assert "--address=ray-head:6380" in services["ray-worker"]["command"]
    assert "--port=6380" in services["ray-head"]["command"]

    mlflow_command = services["mlflow"]["command"][-1].split("exec mlflow server", 1)[1]
    used = command_flags(mlflow_command)
    assert used <= command_flags(help_text("mlflow", "server")), used
    assert {"--serve-artifacts", "--backend-store-uri", "--artifacts-destination"} <= used

    dashboard_command = services["dashboard"]["command"][-1].split("exec peftlab dashboard", 1)[1]
    assert command_flags(dashboard_command) <= command_flags(help_text("peftlab", "dashboard"))


def test_dockerfile_builds_one_image_from_build_args():
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.MULTILINE))
    assert args["BASE_IMAGE"].startswith("python:3.11")
    assert "FROM ${BASE_IMAGE}" in dockerfile
    # The image's torch is the one scripts/bootstrap.sh installs, from the CPU index by default.
    assert f'"torch=={args["TORCH_VERSION"]}"' in (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert re.search(r"^USER (?!root)\w+$", dockerfile, flags=re.MULTILINE), "services must not run as root"
    assert "EXPOSE" not in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY of a missing path: {path}"

    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", "peftlab-runs", "tests"} <= ignored
