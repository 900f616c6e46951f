"""(IA)^3 through peft's IA3Config: learned vectors rescale the outputs of the target layers
(the inputs of feed-forward ones); targets default to peft's per-architecture choice."""
from __future__ import annotations

from peft import IA3Config
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS,
)
from peft.tuners.ia3 import IA3Model
from torch import nn

from .base import HParam, TaskInfo
from .peft_backed import PeftMethod, peft_task_type, targeted
from .registry import register


@register
class IA3(PeftMethod):
    name = "ia3"
    summary = "learned scaling vectors on keys, values and feed-forward layers, and the head"
    paper = "Liu et al. 2022, (IA)^3 / T-Few, arXiv 2205.05638"
    formula = "d_out per target layer (d_in for feed-forward ones) + head"
    mergeable = True
    identity_at_init = True
    default_lr = 3e-3
    hparams = (
        HParam(
            "target_modules", list, None,
            "layers to rescale; default: peft's choice for the architecture (bert: key, value, output.dense)",
        ),
        HParam(
            "feedforward_modules", list, None,
            "targets rescaled on their input, not their output; default: peft's choice for the architecture "
            "(bert: output.dense, which also matches attention.output.dense), kept to those in target_modules",
        ),
    )

    def _modules(self, model: nn.Module, hp: dict) -> tuple[list[str] | None, list[str]]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = hp["target_modules"] or TARGET_DEFAULTS.get(model_type)
        feedforward = hp["feedforward_modules"]
        if feedforward is None:
            feedforward = [m for m in FEEDFORWARD_DEFAULTS.get(model_type, []) if m in (targets or [])]
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
            model_type = model.config.model_type
            return [f"peft has no default (IA)^3 targets for model type '{model_type}'; set target_modules"]
        if not set(feedforward) <= set(targets):
            return [f"feedforward_modules {feedforward} must all be listed in target_modules {targets}"]
        return super()._problems(model, hp, task)

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        config = self.peft_config(model, hp, task)
        return sum(
            m.in_features if IA3Model._check_target_module_feedforward(config, name) else m.out_features
            for name, m in targeted(model, config)
        )
