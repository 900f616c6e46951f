"""Checks of the results store URL and the MLflow tracking URI, before Ray starts or anything is
created: a bad location is one line and exit 2 in seconds, not a traceback or a minutes-long retry."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from peftlab.errors import UserError

STORE_DRIVERS = ("sqlite", "postgresql", "postgresql+psycopg")
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "postgresql+psycopg", "mysql", "mysql+pymysql")
TIMEOUT_S = 5.0


def check_writable_file(path: Path, what: str) -> None:
    """`path` is, or can be created as, a file we can write; probes without leaving anything."""
    path = path.expanduser()
    if path.exists():
        if not path.is_file():
            raise UserError(f"{what} {path} is not a file")
        if not os.access(path, os.W_OK):
            raise UserError(f"{what} {path} is not writable")
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    try:
        # What can be created in the nearest existing folder can be created below it; the probe
        # goes away at once (on /proc and read-only mounts it fails, as the real file would).
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be created: {exc.strerror or exc} in {ancestor}") from None


def check_reachable(host: str, port: int, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach {what} at {host}:{port}: {exc.strerror or exc}") from None


def check_store_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"results store URL {url!r} is not a database URL (sqlite:///PATH or "
                        "postgresql+psycopg://USER@HOST:PORT/DB)") from None
    if parsed.drivername not in STORE_DRIVERS:
        raise UserError(f"results store URL {parsed.render_as_string()!r}: unsupported database "
                        f"'{parsed.drivername}' (use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB)")
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise UserError(f"results store URL {url!r} names no file: use sqlite:///PATH")
        check_writable_file(Path(parsed.database), "results store")
    else:
        check_reachable(parsed.host or "localhost", parsed.port or 5432, "the results store")


def check_tracking_uri(uri: str) -> None:
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    if scheme not in TRACKING_SCHEMES:
        raise UserError(f"MLflow tracking URI {uri!r}: unsupported scheme '{scheme}' "
                        "(use sqlite:///PATH, http(s)://HOST:PORT, file:///PATH or a database URL)")
    if scheme == "sqlite":
        database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
        if not database:
            raise UserError(f"MLflow tracking URI {uri!r} names no file: use sqlite:///PATH")
        check_writable_file(Path(database), "MLflow tracking database")
    elif scheme in ("http", "https"):
        if not parsed.hostname:
            raise UserError(f"MLflow tracking URI {uri!r} names no host")
        check_reachable(parsed.hostname, parsed.port or (443 if scheme == "https" else 80), "MLflow tracking")
    elif scheme == "file":
        folder = Path(parsed.path if parsed.scheme else uri)
        check_writable_file(folder / ".probe", "MLflow file store")
    elif parsed.hostname:
        check_reachable(parsed.hostname, parsed.port or (5432 if scheme.startswith("postgresql") else 3306),
                        "the MLflow database")


def require_store(url: str) -> None:
    """A reader's check: the store must already exist (a reader never creates one)."""
    from sqlalchemy.engine import make_url

    check_store_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).expanduser().is_file():
        raise UserError(f"no results store at {url}: run a sweep first (peftlab run SPEC)")
