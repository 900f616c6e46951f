"""A trial's trainable state at an evaluation, and how it is written to and read from a folder:
what a retried or resumed trial continues from, so it loses at most one checkpoint interval.

The state is tensors, numbers and lists only (read back with `weights_only`, so nothing in it can
run code), beside an owner record naming the experiment and trial it belongs to; a DeepSpeed
engine's own files, where it writes them, are read only once that record is checked.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "trainable_state.rank{rank}.pt"
"""One per process of the trial: a multi-worker trial's ranks each write theirs into one checkpoint."""
OWNER_FILE = "peftlab-checkpoint.json"


def weights(module: nn.Module, *, parameters: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of the trainable parameters (unless `parameters` is False) and every buffer
    (batch norm statistics move even when frozen): what training changed."""
    return {
        "parameters": {name: p.detach().cpu().clone() for name, p in module.named_parameters()
                       if p.requires_grad} if parameters else {},
        "buffers": {name: b.detach().cpu().clone() for name, b in module.named_buffers()},
    }


def put_back(module: nn.Module, state: dict[str, Any]) -> None:
    """Copy what `weights` took back into the module."""
    parameters, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    missing = [name for name in state["parameters"] if name not in parameters]
    missing += [name for name in state["buffers"] if name not in buffers]
    if missing:
        raise ValueError(f"checkpoint does not match the model: no {missing[0]} in it")
    with torch.no_grad():
        for name, value in state["parameters"].items():
            parameters[name].copy_(value)
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)


def capture(module: nn.Module, step: int, stepper_state: dict[str, Any], progress: dict[str, float], *,
            parameters: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What training needs to continue after `step`: trainable parameters (unless the stepper saves
    them itself) and every buffer (batch norm statistics move even when frozen), the stepper's
    optimizer/schedule/scaler, the random states, the loop's progress counters and its `extra`
    state (the selected evaluation). Frozen weights come from the model as loaded."""
    version, internal, gauss = random.getstate()
    return {
        "step": step,
        **weights(module, parameters=parameters),
        "stepper": stepper_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": [version, list(internal), gauss],
        "progress": dict(progress),
        "extra": extra or {},
    }


def restore(module: nn.Module, state: dict[str, Any]) -> None:
    """Put the captured parameters, buffers and random states back (the stepper restores its own)."""
    put_back(module, state)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def write(state: dict[str, Any], folder: Path, rank: int = 0) -> Path:
    """This process's captured state into a checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE.format(rank=rank))
    return folder


def claim(folder: Path, owner: dict[str, str]) -> None:
    """Name the experiment and trial this checkpoint belongs to; only that trial restores it."""
    (folder / OWNER_FILE).write_text(json.dumps(owner, sort_keys=True))


def check_owner(folder: Path, owner: dict[str, str]) -> None:
    """Refuse a checkpoint that another trial (or no peftlab trial) wrote. The record names the
    trial, it does not sign the files: the storage itself must be writable only by those who run
    peftlab, as Tune's own state there is unpickled on restore."""
    try:
        found = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        found = None
    if found != owner:
        raise ValueError(f"checkpoint {folder} was not written by trial {owner.get('trial_id')} "
                         f"of experiment {owner.get('experiment')}; it is not restored")


def read_state(folder: Path, rank: int = 0) -> dict[str, Any]:
    """One process's state from a checkpoint whose owner was checked; nothing but tensors and plain
    values is unpickled (`weights_only`)."""
    return torch.load(folder / STATE_FILE.format(rank=rank), map_location="cpu", weights_only=True)
