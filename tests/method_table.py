"""The contract table's row type and shared counting helpers; rows live in method_rows_*.py.
Each method family keeps its rows in its own module, and the table is every such module's ROWS."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from typing import NamedTuple

from torch import nn
from transformers.pytorch_utils import Conv1D

from tiny_models import CONFIGS, HEADS, head_names

HEAD_PREFIXES = tuple({h for names in HEADS.values() for h in names} | {"classifier"})


def head(model: nn.Module) -> int:
    return sum(p.numel() for h in head_names(model.config) for p in model.get_submodule(h).parameters())


def in_any_head(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAD_PREFIXES)


class Dims(NamedTuple):
    in_features: int
    out_features: int


def linears(model: nn.Module, keep: Callable[[str], bool]) -> list[Dims]:
    """The shapes of the linear layers outside the head whose names `keep` accepts (GPT-2's Conv1D,
    which stores its weight d_in x d_out, included)."""
    found = []
    for n, m in model.named_modules():
        if in_any_head(n) or not keep(n):
            continue
        if isinstance(m, nn.Linear):
            found.append(Dims(m.in_features, m.out_features))
        elif isinstance(m, Conv1D):
            found.append(Dims(*m.weight.shape))
    return found


@dataclass
class Case:
    method: str
    hparams: dict
    expected: Callable[[nn.Module], int]  # trainable count from the unadapted model
    owns: Callable[[str], bool]  # names of the parameters the method trains (head included)
    peft: Callable[[], object] | None = None  # the plain peft config it must equal
    id: str = ""
    shapes: tuple[str, ...] = field(default=tuple(CONFIGS))
    calibration: Callable[[object], object] | None = None
    """config -> the Calibration a calibrating method reads (default: the tiny model's batches only)."""

    def __post_init__(self) -> None:
        self.id = self.id or self.method


def peft_owned(marker: str) -> Callable[[str], bool]:
    return lambda n: marker in n or ".modules_to_save." in n


def all_cases() -> list[Case]:
    """Every row of every tests/method_rows_*.py module."""
    modules = sorted(p.stem for p in Path(__file__).parent.glob("method_rows_*.py"))
    return [case for name in modules for case in importlib.import_module(name).ROWS]
