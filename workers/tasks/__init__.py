"""Task types: how a trial turns a task spec into data, a model with its head, batches, a loss,
metrics and a retention measure. `task_kind(type)` is the only way in; nothing else names a type."""
from __future__ import annotations

from peftlab.errors import UserError

from .base import Task, TaskKind
from .causal_lm import CausalLmKind
from .image_classification import ImageClassificationKind
from .multiple_choice import MultipleChoiceKind
from .text_classification import TextClassificationKind

KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (TextClassificationKind(), ImageClassificationKind(), CausalLmKind(), MultipleChoiceKind())
}


def task_kind(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UserError(f"unknown task type '{name}' (known: {', '.join(KINDS)})") from None


__all__ = ["KINDS", "Task", "TaskKind", "task_kind"]
