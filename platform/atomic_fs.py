"""The filesystem Tune keeps its state and checkpoints on: local (or a shared mount), with every
written file replaced whole, so a driver killed while Tune copies its state leaves the last copy intact."""
from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
import threading
from collections.abc import Callable

import pyarrow
import pyarrow.fs

PARTIAL = ".partial"
"""Suffix of a file still being written (hidden, beside its destination); a kill leaves only these."""


_UMASK = os.umask(0)
os.umask(_UMASK)
"""The process's umask, read once: written files get the mode an ordinary open() would give."""


TRIAL_CHECKPOINT = re.compile(r"checkpoint_\d{6}")
"""A Tune trial checkpoint's folder name; Tune's state names the trial's newest one."""

TUNE_STATE = re.compile(r"experiment_state-.+\.json")
"""The file of Tune's state that names each trial's checkpoint."""


class _DeferredDeletions:
    """Trial checkpoints Tune has dropped, kept until a Tune state written after the drop is whole.

    Tune deletes a trial's previous checkpoint as soon as the next one is registered, and saves its
    state later: a driver killed in between leaves a state naming a deleted checkpoint, and `resume`
    then fails that trial. Every copy of the handler in a process shares this one list.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._pending: list[tuple[int, str]] = []

    def defer(self, path: str) -> None:
        with self._lock:
            self._pending.append((next(self._clock), path))

    def state_started(self) -> Callable[[], None]:
        """Called when a Tune state file is opened; the returned callable, once it is in place,
        deletes every checkpoint dropped before the opening (the state no longer names them)."""
        with self._lock:
            started = next(self._clock)

        def written() -> None:
            with self._lock:
                due = [path for stamp, path in self._pending if stamp < started]
                self._pending = [(stamp, path) for stamp, path in self._pending if stamp >= started]
            for path in due:
                _delete_dir(path)

        return written

    def pending(self) -> list[str]:
        with self._lock:
            return [path for _, path in self._pending]


_DEFERRED = _DeferredDeletions()


def _delete_dir(path: str) -> None:
    try:
        pyarrow.fs.LocalFileSystem().delete_dir(path)
    except FileNotFoundError:
        pass


class _ReplacedOnClose(io.FileIO):
    """A file written under a temporary name and renamed over its destination when closed; one whose
    writing failed, or that is dropped without being closed, is removed and the old file stays."""

    def __init__(self, path: str) -> None:
        folder, name = os.path.split(path)
        descriptor, self._partial = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=PARTIAL)
        os.chmod(self._partial, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide it from a shared mount's readers
        super().__init__(descriptor, "wb", closefd=True)
        self._destination, self._failed = path, False
        self._replaced = _DEFERRED.state_started() if TUNE_STATE.fullmatch(name) else None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except BaseException:
            self._failed = True
            raise

    def abort(self) -> None:
        """Drop what was written; the destination keeps its old content."""
        self._failed = True
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._failed:
                self.flush()
                os.fsync(self.fileno())  # the rename must not land before the bytes do
        except BaseException:
            self._failed = True
            raise
        finally:
            super().close()
            if self._failed:
                os.unlink(self._partial)
            else:
                os.replace(self._partial, self._destination)
                if self._replaced is not None:
                    self._replaced()

    def __del__(self) -> None:
        if not self.closed:  # garbage, not a finished file
            self.abort()


class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
    """pyarrow's local filesystem, except that output streams and copies write a temporary file and
    rename it over the destination: readers see the old file or the new one, never a truncated one.
    A dropped trial checkpoint stays until a later Tune state is whole (`_DeferredDeletions`)."""

    def __init__(self) -> None:
        self._local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __hash__(self) -> int:
        return hash(AtomicLocalHandler)

    def __reduce__(self):
        return AtomicLocalHandler, ()

    def equals(self, other) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return "peftlab-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths):
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        if TRIAL_CHECKPOINT.fullmatch(os.path.basename(path.rstrip("/"))):
            _DEFERRED.defer(path)
        else:
            self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the contents of the filesystem root")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        target = _ReplacedOnClose(dest)
        try:
            with self._local.open_input_stream(src) as source:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
        except BaseException:
            target.abort()
            raise
        target.close()

    def open_input_stream(self, path: str):
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return pyarrow.PythonFile(_ReplacedOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._local.open_append_stream(path)


def atomic_local_filesystem() -> pyarrow.fs.FileSystem:
    return pyarrow.fs.PyFileSystem(AtomicLocalHandler())
