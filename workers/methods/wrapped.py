"""Shared machinery for methods implemented here that wrap target linear layers.

The frozen `nn.Linear` (GPT-2's Conv1D is first turned into the equal `nn.Linear`) stays inside an
`AdaptedLinear`, which adds the method's tensors and defines the adapted weight; merging folds each
wrapper back into a plain `nn.Linear`.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peftlab.workers.architectures import no_default

from .base import TARGET_MODULES, Method, TaskInfo, in_head, not_found, resolve_targets

ALL_LINEAR = "all-linear"
__all__ = ["ALL_LINEAR", "TARGET_MODULES", "AdaptedLinear", "LinearWrapping", "linear_dims", "lora_factors", "target_names"]


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer, GPT-2's Conv1D (weight stored d_in x d_out) included; None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def lora_factors(weight: torch.Tensor, r: int, trainable: bool = True) -> tuple[nn.Parameter, nn.Parameter]:
    """A LoRA pair for a d_out x d_in weight, as LoRA starts it: A (r x d_in) Kaiming-uniform, B (d_out x r)
    zero, so B A is zero and the adapted layer starts as the frozen one."""
    A = nn.Parameter(torch.empty(r, weight.shape[1], dtype=weight.dtype, device=weight.device),
                     requires_grad=trainable)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = nn.Parameter(torch.zeros(weight.shape[0], r, dtype=weight.dtype, device=weight.device),
                     requires_grad=trainable)
    return A, B


def as_linear(module: nn.Module) -> nn.Linear:
    """The layer as an nn.Linear computing the same function (a Conv1D's weight transposed)."""
    if isinstance(module, nn.Linear):
        return module
    d_in, d_out = linear_dims(module)
    weight = module.weight
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


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

    def plain(self) -> nn.Linear:
        """The equal plain nn.Linear, the update merged into its weight."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.adapted_weight())
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged


def target_names(model: nn.Module, targets: list[str] | str | None, task: TaskInfo) -> list[str]:
    """Names of the modules the targets match (exact name or dotted suffix), head excluded; None: the
    architecture's default targets."""
    targets = resolve_targets(model, targets) or []
    names = []
    for name, module in model.named_modules():
        if not name or in_head(name, task):
            continue
        if targets == ALL_LINEAR:
            if linear_dims(module) is not None:
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


class LinearWrapping(Method):
    """A method whose parameters live in `layer` wrappers around the target linear layers."""

    layer: ClassVar[type[AdaptedLinear]]
    mergeable = True

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        targets = resolve_targets(model, hp["target_modules"])
        if targets is None:
            return [no_default(model, self.name)]
        modules = dict(model.named_modules())
        found = target_names(model, targets, task)
        problems = []
        if targets != ALL_LINEAR:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and linear_dims(m) is not None})
            for t in targets:
                if not any(n == t or n.endswith("." + t) for n in found):
                    problems.append(not_found(t, model, linear))
        for name in found:
            if linear_dims(modules[name]) is None:
                problems.append(f"target module '{name}' is a {type(modules[name]).__name__}, not a linear layer")
        if not found and not problems:
            problems.append(f"no linear layer of {type(model).__name__} matches target_modules={targets}")
        shapes = [dims for n in found if (dims := linear_dims(modules[n])) is not None]
        return problems + self._layer_problems(shapes, hp)

    def _layer_problems(self, shapes: list[tuple[int, int]], hp: dict) -> list[str]:
        """Shape constraints of the method on the target layers' (d_in, d_out) (e.g. block sizes that
        must divide d_in)."""
        return []

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, task))
        for name in target_names(model, hp["target_modules"], task):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, self.layer(as_linear(getattr(parent, child)), hp))
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        modules = dict(model.named_modules())
        return sum(self.layer.count(*linear_dims(modules[n]), hp)
                   for n in target_names(model, hp["target_modules"], task))

    def merge(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, AdaptedLinear):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.plain())
        return model
