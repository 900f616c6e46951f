"""Methods that train a subset of the model's own parameters and add none: full, linear_probe, bitfit.
Nothing is injected, so each is the identity at init and "merging" returns the model as it is."""
from __future__ import annotations

from abc import abstractmethod

from torch import nn

from peftlab.workers.architectures import describe

from .base import Method, TaskInfo, in_head
from .registry import register


class Selective(Method):
    """Trains the parameters `trains` selects (the head always); the rest are frozen."""

    mergeable = True
    identity_at_init = True

    @abstractmethod
    def trains(self, param_name: str) -> bool:
        """Whether a parameter outside the head is trained."""

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for n, p in model.named_parameters():
            p.requires_grad_(in_head(n, task) or self.trains(n))
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if self.trains(n) and not in_head(n, task))

    def merge(self, model: nn.Module) -> nn.Module:
        return model


@register
class Full(Selective):
    name = "full"
    summary = "every parameter of the model"
    paper = "full fine-tuning (baseline)"
    formula = "all parameters"
    default_lr = 2e-5

    def trains(self, param_name: str) -> bool:
        return True


@register
class LinearProbe(Selective):
    name = "linear_probe"
    summary = "only the task head; the backbone is frozen"
    paper = "linear probing (baseline)"
    formula = "head only"
    default_lr = 1e-3
    needs = frozenset({"new_head"})

    def trains(self, param_name: str) -> bool:
        return False


@register
class BitFit(Selective):
    name = "bitfit"
    summary = "every bias term (LayerNorm biases included) and the head"
    paper = "Ben Zaken et al. 2022, BitFit, arXiv 2106.10199"
    formula = "number of bias entries + head"
    default_lr = 1e-3

    def trains(self, param_name: str) -> bool:
        return param_name.rsplit(".", 1)[-1] == "bias"

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        if self._count(model, hp, task) or task.head_modules:
            return []
        # Llama-style decoders have no bias terms (RMSNorm, bias-free projections) and a causal LM no new head.
        return [f"method bitfit trains bias terms, and {describe(model)} has none; with no new head on "
                f"{task.type} tasks, nothing would train"]
