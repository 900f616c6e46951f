"""Budget matching: each method's size hyperparameter set so its trainable count meets the spec's
`budget` on each task's model; methods of fixed size are kept and their distance reported."""
from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import UserError
from peftlab.spec import ExperimentSpec, budget_params

WITHIN = 0.10
"""A method counts as on budget when its trainable count is within 10% of the budget."""


@dataclass(frozen=True)
class BudgetFit:
    """How one method meets the budget on one task."""

    task: str
    method: str
    budget: int
    """The budget in parameters (a percentage resolved against the backbone)."""
    size: dict
    """{size hyperparameter: value}; empty when the method has no size."""
    expected: int
    """Trainable parameters at that size, head included."""
    note: str
    """Empty when within WITHIN of the budget, else why not."""

    @property
    def deviation(self) -> float:
        return self.expected / self.budget - 1.0


def fit_budgets(spec: ExperimentSpec, models: dict[str, tuple]) -> list[BudgetFit]:
    """One BudgetFit per (task, method); `models` maps a task label to (meta model, TaskInfo)."""
    from peftlab.workers.methods import get_method

    spaces = _base_configs(spec)
    fits, refused = [], []  # a sparse method off its budget trains another size than compared: refused
    for task in spec.tasks:
        model, info = models[task.label]
        # A percentage is of the model as a trial loads it (what the store records as total_params).
        budget = budget_params(spec.budget, sum(p.numel() for p in model.parameters()))
        for name in spec.methods_for(task):
            method = get_method(name)
            size = next((h.name for h in method.hparams if h.size), None)
            hparams = spaces[name]
            if size is None:
                expected, chosen, note = method.expected_trainable(model, hparams, info), {}, "fixed size"
            else:
                try:
                    sized = method.size_for_budget(model, hparams, info, budget)
                except UserError as exc:
                    expected = method.expected_trainable(model, hparams, info)
                    fits.append(BudgetFit(task.label, name, budget, {}, expected, f"cannot be sized: {exc}"))
                    continue
                chosen = {size: sized[size]}
                expected, note = method.expected_trainable(model, sized, info), ""
            fit = BudgetFit(task.label, name, budget, chosen, expected, note)
            if abs(fit.deviation) > WITHIN and method.sparse:
                refused.append(f"{name} cannot train {budget:,} parameters on {task.label}: its closest "
                               f"{size or 'size'} gives {expected:,} ({fit.deviation:+.0%}); {note or 'change the budget'}")
                continue
            if abs(fit.deviation) > WITHIN:
                reason = note or f"closest {size}"
                fit = BudgetFit(task.label, name, budget, chosen, expected,
                                f"{reason}: {fit.deviation:+.0%} of the budget")
            fits.append(fit)
    if refused:
        raise UserError("budget: " + "; ".join(refused))
    return fits


def _base_configs(spec: ExperimentSpec) -> dict[str, dict]:
    """Each method's first value of every fixed or listed hyperparameter: what shapes its count."""
    from peftlab.spec import method_spaces

    spaces, _ = method_spaces(spec)
    return {name: {k: leaf.values[0] for k, leaf in space.leaves.items() if leaf.kind in ("fixed", "choice")}
            for name, space in spaces.items()}
