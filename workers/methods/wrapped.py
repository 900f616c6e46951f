"""Shared machinery for methods implemented here that wrap target linear layers.

The frozen `nn.Linear` stays inside an `AdaptedLinear`, which adds the method's tensors and
defines the adapted weight; merging folds each wrapper back into a plain `nn.Linear`.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .base import HParam, Method, TaskInfo, in_head

ALL_LINEAR = "all-linear"
TARGET_MODULES = HParam(
    "target_modules", list, ["query", "value"],
    "names (or name suffixes) of the linear layers to adapt; 'all-linear' for every linear layer outside the head",
    choices=(ALL_LINEAR,),
)


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus a method's trainable tensors.

    Subclasses create their tensors in `__init__`, define `adapted_weight` (W' as a function
    of the frozen W and the trainable tensors) and `count` (the parameter formula). The
    default forward materialises W'; override it where the method has a cheaper form.
    """

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def adapted_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.adapted_weight(), self.base.bias)

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        """Trainable parameters this wrapper adds to a d_out x d_in layer."""
        raise NotImplementedError


def target_names(model: nn.Module, targets: list[str] | str, task: TaskInfo) -> list[str]:
    """Names of the modules the targets match (exact name or dotted suffix), head excluded."""
    names = []
    for name, module in model.named_modules():
        if not name or in_head(name, task):
            continue
        if targets == ALL_LINEAR:
            if isinstance(module, nn.Linear):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


class LinearWrapping(Method):
    """A method whose parameters live in `layer` wrappers around the target linear layers."""

    layer: ClassVar[type[AdaptedLinear]]
    mergeable = True

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        targets = hp["target_modules"]
        modules = dict(model.named_modules())
        found = target_names(model, targets, task)
        problems = []
        if targets != ALL_LINEAR:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear) and n})
            for t in targets:
                if not any(n == t or n.endswith("." + t) for n in found):
                    problems.append(f"target module '{t}' not found in {type(model).__name__} "
                                    f"(its linear layers: {', '.join(linear)})")
        for name in found:
            if not isinstance(modules[name], nn.Linear):
                problems.append(f"target module '{name}' is a {type(modules[name]).__name__}, not a linear layer")
        if not found and not problems:
            problems.append(f"no linear layer of {type(model).__name__} matches target_modules={targets}")
        return problems + self._layer_problems([modules[n] for n in found if isinstance(modules[n], nn.Linear)], hp)

    def _layer_problems(self, layers: list[nn.Linear], hp: dict) -> list[str]:
        """Shape constraints of the method (e.g. block sizes that must divide d_in)."""
        return []

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, task))
        for name in target_names(model, hp["target_modules"], task):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, self.layer(getattr(parent, child), hp))
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        modules = dict(model.named_modules())
        return sum(self.layer.count(modules[n].in_features, modules[n].out_features, hp)
                   for n in target_names(model, hp["target_modules"], task))

    def merge(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, AdaptedLinear):
                base = module.base
                plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                  device=base.weight.device, dtype=base.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(module.adapted_weight())
                    if base.bias is not None:
                        plain.bias.copy_(base.bias)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, plain)
        return model
