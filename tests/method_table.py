"""The contract table's row type and shared counting helpers; rows live in method_rows_*.py.
Each method family keeps its rows in its own module, and the table is every such module's ROWS."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from tiny_models import CONFIGS


def head(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.parameters())


def linears(model: nn.Module, keep: Callable[[str], bool]) -> list[nn.Linear]:
    return [
        m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and keep(n) and not n.startswith("classifier")
    ]


@dataclass
class Case:
    method: str
    hparams: dict
    expected: Callable[[nn.Module], int]  # trainable count from the unadapted model
    owns: Callable[[str], bool]  # names of the parameters the method trains (head included)
    peft: Callable[[], object] | None = None  # the plain peft config it must equal
    id: str = ""
    shapes: tuple[str, ...] = field(default=tuple(CONFIGS))

    def __post_init__(self) -> None:
        self.id = self.id or self.method


def peft_owned(marker: str) -> Callable[[str], bool]:
    return lambda n: marker in n or ".modules_to_save." in n


def all_cases() -> list[Case]:
    """Every row of every tests/method_rows_*.py module."""
    modules = sorted(p.stem for p in Path(__file__).parent.glob("method_rows_*.py"))
    return [case for name in modules for case in importlib.import_module(name).ROWS]
