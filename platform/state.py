"""Where each task's Ray Tune state lives, and whether it may be restored: folders named from a
safe key (never from raw spec text), and an ownership record peftlab writes beside the state."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from peftlab import settings
from peftlab.errors import UserError

SEARCH, SEEDS = "search", "seeds"
"""The two phases of a task: the search, then (with `seeds`) re-runs of each method's best."""
OWNER = "peftlab-owner.json"
"""Written by peftlab before Tune writes anything: which experiment, spec, task and phase."""


def state_key(label: str) -> str:
    """A folder name for a task label: its safe characters (at most 40) and a hash of all of it."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:40] or "task"
    return f"{slug}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def state_path(experiment: str, label: str, phase: str = SEARCH) -> Path:
    """The Tune experiment folder of one task's phase, always directly under the Ray storage."""
    suffix = "" if phase == SEARCH else f".{phase}"
    path = settings.ray_storage() / f"{experiment}.{state_key(label)}{suffix}"
    assert path.parent == settings.ray_storage()  # the name holds no separator, by construction
    return path


def _owner(experiment: str, spec_hash: str, label: str, phase: str) -> dict:
    return {"experiment": experiment, "spec_hash": spec_hash, "task": label, "phase": phase}


def claim(path: Path, experiment: str, spec_hash: str, label: str, phase: str) -> None:
    """Record that this folder holds peftlab's state for this experiment's task and phase."""
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER).write_text(json.dumps(_owner(experiment, spec_hash, label, phase)))


def check_owned(path: Path, experiment: str, spec_hash: str, label: str, phase: str) -> None:
    """Refuse (one line) to restore state that peftlab did not write for this very experiment,
    spec, task and phase: restoring unpickles it."""
    try:
        owner = json.loads((path / OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if owner != _owner(experiment, spec_hash, label, phase):
        what = "has no peftlab ownership record" if owner is None else (
            f"was written for experiment {owner.get('experiment')!r} with spec {owner.get('spec_hash')!r}"
            if isinstance(owner, dict) else "has an unreadable ownership record")
        raise UserError(f"Tune state at {path} {what}, not for {experiment!r} with spec {spec_hash}: "
                        "it will not be restored; remove that folder to start this task afresh")
