"""(IA)^3 through peft's IA3Config: learned vectors rescale the outputs of the target layers
(the inputs of feed-forward ones); targets default to the architecture table's key, value and FFN output."""
from __future__ import annotations

from peft import IA3Config
from peft.tuners.ia3 import IA3Model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.workers.architectures import architecture, no_default

from .base import HParam, TaskInfo
from .peft_backed import PeftMethod, peft_task_type, targeted
from .registry import register
from .wrapped import linear_dims


@register
class IA3(PeftMethod):
    name = "ia3"
    summary = "learned scaling vectors on keys, values and feed-forward layers, and the head"
    paper = "Liu et al. 2022, (IA)^3 / T-Few, arXiv 2205.05638"
    formula = "d_out per target layer (d_in for feed-forward ones) + head"
    mergeable = True
    identity_at_init = True
    default_lr = 3e-3
    layer_types = (nn.Linear, Conv1D)
    hparams = (
        HParam(
            "target_modules", list, None,
            "layers to rescale; default: the architecture's key and value projections and FFN output projection "
            "(bert: key, value, output.dense, as peft chooses; llama: k_proj, v_proj, down_proj)",
        ),
        HParam(
            "feedforward_modules", list, None,
            "targets rescaled on their input, not their output; default: the architecture's FFN output projection "
            "(bert: output.dense, which also matches attention.output.dense), kept to those in target_modules",
        ),
    )

    def _modules(self, model: nn.Module, hp: dict) -> tuple[list[str] | None, list[str]]:
        found = architecture(model)
        targets = hp["target_modules"] or (list(found.rescaled) if found else None)
        feedforward = hp["feedforward_modules"]
        if feedforward is None:
            feedforward = [m for m in (found.feedforward if found else ()) if m in (targets or [])]
        return targets, feedforward

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> IA3Config:
        targets, feedforward = self._modules(model, hp)
        return IA3Config(
            task_type=peft_task_type(task),
            target_modules=list(targets),
            feedforward_modules=list(feedforward),
            modules_to_save=list(task.head_modules),
        )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        targets, feedforward = self._modules(model, hp)
        if targets is None:
            return [no_default(model, self.name)]
        if not set(feedforward) <= set(targets):
            return [f"feedforward_modules {feedforward} must all be listed in target_modules {targets}"]
        return super()._problems(model, hp, task)

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        config = self.peft_config(model, hp, task)
        return sum(
            linear_dims(m)[0] if IA3Model._check_target_module_feedforward(config, name) else linear_dims(m)[1]
            for name, m in targeted(model, config)
        )
