"""Search-space leaves of a spec: a fixed value, a choice, or a numeric range.

A leaf is parsed once from YAML and then either sampled with a seeded RNG (random and grid
search) or turned into an Optuna suggestion (TPE); no spec text is ever evaluated.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftlab.errors import UserError

if TYPE_CHECKING:
    import optuna

    from peftlab.workers.methods.base import HParam

RANGES = ("loguniform", "uniform", "randint")


@dataclass(frozen=True)
class Leaf:
    """kind is fixed, choice, loguniform, uniform or randint (bounds inclusive)."""

    kind: str
    values: tuple

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.kind == "uniform":
            return rng.uniform(low, high)
        return rng.randint(low, high)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Ask Optuna for a value; fixed leaves are not suggested (they are constants)."""
        if self.kind == "choice":
            # Optuna's categorical needs hashable scalars; lists are chosen by index.
            if any(isinstance(v, list) for v in self.values):
                return self.values[trial.suggest_categorical(name, list(range(len(self.values))))]
            return trial.suggest_categorical(name, list(self.values))
        low, high = self.values
        if self.kind == "loguniform":
            return trial.suggest_float(name, low, high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(name, low, high)
        return trial.suggest_int(name, low, high)

    def grid_values(self) -> tuple:
        return self.values if self.kind in ("fixed", "choice") else ()

    def describe(self) -> str:
        if self.kind == "fixed":
            return repr(self.values[0])
        if self.kind == "choice":
            return "one of " + ", ".join(repr(v) for v in self.values)
        return f"{self.kind}[{self.values[0]:g}, {self.values[1]:g}]"


def _checked(value: Any, hparam: HParam) -> Any:
    problem = hparam.check(value)
    if problem:
        raise UserError(problem.removeprefix(f"{hparam.name}: "))  # the key path already names it
    return value


def parse_leaf(raw: Any, hparam: HParam) -> Leaf:
    """Parse one YAML value for `hparam`; raises UserError naming what is wrong."""
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in RANGES:
            raise UserError(f"a range is one of {{loguniform|uniform|randint: [low, high]}}, got keys {sorted(raw)}")
        kind, bounds = next(iter(raw.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise UserError(f"{kind} needs [low, high] numbers, got {bounds!r}")
        if hparam.kind not in (int, float):
            raise UserError(f"{kind} range given for a {hparam.kind.__name__} hyperparameter")
        if kind != "randint" and hparam.kind is int:
            raise UserError(f"{kind} gives floats; use randint for an integer hyperparameter")
        if kind == "randint" and not all(isinstance(b, int) for b in bounds):
            raise UserError(f"randint needs integer bounds, got {bounds!r}")
        low, high = bounds
        if low >= high:
            raise UserError(f"empty or inverted range {kind}: [{low}, {high}] (low must be below high)")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"loguniform needs positive bounds, got [{low}, {high}]")
        return Leaf(kind, (_checked(low, hparam), _checked(high, hparam)))
    if isinstance(raw, list):
        is_choice = hparam.kind is not list or (raw and all(isinstance(v, list) for v in raw))
        if not is_choice:
            return Leaf("fixed", (_checked(raw, hparam),))
        if not raw:
            raise UserError("empty list of choices")
        return Leaf("choice", tuple(_checked(v, hparam) for v in raw))
    return Leaf("fixed", (_checked(raw, hparam),))
