"""The filesystem Tune keeps peftlab's state on: a writer SIGKILLed mid-file leaves the previous file
whole (the truncated copy that made a resume fail cannot happen), and it survives the trip to workers."""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap

import pyarrow.fs

from peftlab.atomic_fs import PARTIAL, atomic_local_filesystem


def test_writes_and_copies_replace_the_file_whole(tmp_path):
    fs = atomic_local_filesystem()
    target = tmp_path / "state.json"
    target.write_text("old")
    with fs.open_output_stream(str(target)) as out:
        out.write(b"new ")
        assert target.read_text() == "old"  # nothing visible before the stream closes
        out.write(b"state")
    assert target.read_text() == "new state"

    fs.copy_file(str(target), str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_text() == "new state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.json", "state.json"]


def test_a_writer_killed_mid_file_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "searcher-state.pkl"
    old = pickle.dumps({"trials": list(range(1000))})
    target.write_bytes(old)
    writer = textwrap.dedent(f"""
        import sys, time
        from peftlab.atomic_fs import atomic_local_filesystem
        out = atomic_local_filesystem().open_output_stream({str(target)!r})
        out.write(b"x" * (1 << 20))
        out.flush()
        print("written", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert target.read_bytes() == old
    assert pickle.loads(target.read_bytes()) == {"trials": list(range(1000))}
    [partial] = [p for p in tmp_path.iterdir() if p != target]
    assert partial.name.startswith(".searcher-state.pkl.") and partial.name.endswith(PARTIAL)
    assert partial.stat().st_size == 1 << 20


def test_the_filesystem_pickles_for_workers(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_local_filesystem()))
    assert isinstance(fs, pyarrow.fs.FileSystem) and fs.equals(atomic_local_filesystem())
    fs.create_dir(str(tmp_path / "a" / "b"), recursive=True)
    with fs.open_output_stream(str(tmp_path / "a" / "b" / "f.txt")) as out:
        out.write(b"from a worker")
    with fs.open_input_stream(str(tmp_path / "a" / "b" / "f.txt")) as source:
        assert source.read() == b"from a worker"
    assert [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(str(tmp_path), recursive=True))
            if info.type == pyarrow.fs.FileType.File] == ["f.txt"]


def test_a_write_that_fails_or_is_dropped_leaves_the_old_file(tmp_path):
    from peftlab.atomic_fs import _ReplacedOnClose

    target = tmp_path / "state.json"
    target.write_text("old and whole")
    failing = _ReplacedOnClose(str(target))
    failing.write(b"half")
    failing._failed = True  # what a write error (a full disk) sets
    failing.close()
    dropped = _ReplacedOnClose(str(target))
    dropped.write(b"never closed")
    del dropped
    fs = atomic_local_filesystem()
    try:
        fs.copy_file(str(tmp_path / "missing.json"), str(target))
    except FileNotFoundError:
        pass
    assert target.read_text() == "old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no partial left behind either
    # A written file has the mode an ordinary open() gives it, not mkstemp's private 0600.
    with fs.open_output_stream(str(tmp_path / "new.json")) as out:
        out.write(b"{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_a_dropped_trial_checkpoint_stays_until_a_later_tune_state_is_whole(tmp_path):
    """Tune drops a trial's previous checkpoint before it saves the state that names the next one:
    the dropped folder must outlive every state file opened before the drop, or a driver killed in
    between leaves a state that names a deleted checkpoint."""
    fs = atomic_local_filesystem()
    trial = tmp_path / "trial_a"
    old, new, other = trial / "checkpoint_000000", trial / "checkpoint_000001", tmp_path / "scratch"
    for folder in (old, new, other):
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x")
    state = tmp_path / "experiment_state-2026-12-02_10-00-00.json"

    early = fs.open_output_stream(str(state))  # a state snapshot that began before the drop
    fs.delete_dir(str(old))
    fs.delete_dir(str(other))
    assert not other.exists()  # only trial checkpoints wait
    early.write(b"{}")
    early.close()
    assert old.exists(), "a state begun before the drop may still name the dropped checkpoint"

    later = fs.open_output_stream(str(state))
    later.write(b"{}")
    assert old.exists()  # not until that state is in place
    later.close()
    assert not old.exists() and new.exists()

    from peftlab.atomic_fs import _ReplacedOnClose

    pickle.loads(pickle.dumps(fs)).delete_dir(str(new))  # a copy of the handler, as Tune's checkpoints carry
    failed = _ReplacedOnClose(str(state))
    failed.write(b"{")
    failed.abort()  # a state that never landed
    assert new.exists(), "a state that did not land releases nothing"
    with fs.open_output_stream(str(state)) as out:
        out.write(b"{}")
    assert not new.exists()
