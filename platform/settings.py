"""Where peftlab keeps things: flags, then environment, then defaults under ./peftlab-runs/.

Every path and URL the control plane needs is resolved here and nowhere else.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_STORE = "PEFTLAB_STORE_URL"
ENV_TRACKING = "MLFLOW_TRACKING_URI"
ENV_RAY = "RAY_ADDRESS"
ENV_RAY_API = "RAY_API_SERVER_ADDRESS"
ENV_DATA = "PEFTLAB_DATA_DIR"
ENV_HOME = "PEFTLAB_HOME"
ENV_RAY_STORAGE = "PEFTLAB_RAY_STORAGE"
ENV_BACKBONES = "PEFTLAB_BACKBONES"


def home() -> Path:
    """The folder that holds the default store, MLflow database, Ray storage and adapters."""
    return Path(os.environ.get(ENV_HOME) or "peftlab-runs").resolve()


def store_url(flag: str | None = None) -> str:
    if flag:
        return flag
    if os.environ.get(ENV_STORE):
        return os.environ[ENV_STORE]
    return f"sqlite:///{home() / 'results.db'}"


def tracking_uri(flag: str | None = None) -> str:
    if flag:
        return flag
    if os.environ.get(ENV_TRACKING):
        return os.environ[ENV_TRACKING]
    return f"sqlite:///{home() / 'mlflow.db'}"


def ray_address(flag: str | None = None) -> str | None:
    """None means: start an embedded local Ray instance."""
    return flag or os.environ.get(ENV_RAY) or None


def ray_api_server(flag: str | None = None) -> str | None:
    """The Ray dashboard URL (http://HEAD:8265) that cluster submission talks to; Ray's own
    variable, so `ray job` and `peftlab submit` find the same cluster."""
    return flag or os.environ.get(ENV_RAY_API) or None


def data_dir() -> Path | None:
    value = os.environ.get(ENV_DATA)
    return Path(value).expanduser().resolve() if value else None


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
"""Set (to anything but 0), nothing is downloaded: data sets must then be local."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftlab"


def download_cache() -> Path:
    """Where data sets without a local copy are downloaded to, once."""
    return cache_root() / "datasets"


def backbones_dir() -> Path:
    """Where `peftlab pretrain` puts the backbones it builds (one folder each). Set
    PEFTLAB_BACKBONES to a folder every node mounts and a cluster's trials find them too."""
    value = os.environ.get(ENV_BACKBONES)
    return Path(value).expanduser().resolve() if value else cache_root() / "backbones"


def ray_storage() -> Path:
    """Tune's state and the trials' checkpoints. Set PEFTLAB_RAY_STORAGE to a folder every node
    mounts at the same path (NFS and the like) and trials on every node checkpoint there."""
    value = os.environ.get(ENV_RAY_STORAGE)
    return Path(value).expanduser().resolve() if value else home() / "ray"


def ray_storage_shared() -> bool:
    """Whether the operator declared the Ray storage a folder that every node sees."""
    return bool(os.environ.get(ENV_RAY_STORAGE))


def adapters_dir() -> Path:
    return home() / "adapters"


def mlflow_artifacts() -> Path:
    return home() / "mlartifacts"
