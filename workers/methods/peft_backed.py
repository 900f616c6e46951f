"""Shared base of the methods that peft implements: a subclass turns hyperparameters into a peft
config and states its formula; injection, merge, save and load are peft's own (adapters in peft format)."""
from __future__ import annotations

import copy
from abc import abstractmethod
from pathlib import Path

from typing import ClassVar

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn

from peftlab.workers.architectures import default_targets, no_default

from .base import Applied, Method, TaskInfo, in_head, not_found

def peft_task_type(task: TaskInfo) -> TaskType | None:
    """peft's wrapper class for the task, as its task type names it; None: a plain PeftModel (image
    models take pixel_values, which peft's task-specific wrappers do not pass on)."""
    return TaskType[task.peft_task_type] if task.peft_task_type else None


class PeftMethod(Method):
    """A method whose implementation is peft's; the task head goes into peft's modules_to_save."""

    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear,)
    """Layer classes this method's peft tuner can adapt."""

    @abstractmethod
    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> PeftConfig:
        """The peft config for resolved hyperparameters; modules_to_save must list task.head_modules."""

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        return get_peft_model(model, self.peft_config(model, hp, task))

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        """Every listed target module must match at least one linear layer outside the head."""
        # An unset target_modules means the architecture table's query and value projections.
        if "target_modules" in hp and hp["target_modules"] is None and default_targets(model) is None:
            return [no_default(model, self.name)]
        config = self.peft_config(model, hp, task)
        wanted = getattr(config, "target_modules", None)
        if wanted is None or isinstance(wanted, str):  # None: no targets; str: "all-linear" or a regex
            return []
        problems = []
        kinds = " or ".join(t.__name__ for t in self.layer_types)
        candidates = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, self.layer_types) and not in_head(n, task)}
        )
        for target in sorted(wanted):
            one = copy.copy(config)
            one.target_modules = {target}
            matched = targeted(model, one)
            if not matched:
                problems.append(not_found(target, model, candidates, kinds))
            problems += [
                f"target module '{target}' matches {name} ({type(m).__name__}); {self.name} adapts {kinds} layers"
                for name, m in matched
                if not isinstance(m, self.layer_types)
            ][:1]
        return problems

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            return super().merge(model)
        # peft's generic BaseTuner._replace_module (used by IA3 and most tuners, not LoRA) reads `.weight`
        # of every module it unloads, which a composite head such as RoBERTa's classifier lacks (peft PR
        # #3213, issue #3114). Unwrap the trained head first, with peft's own unload.
        inner = model.get_base_model()
        for name, module in list(inner.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, child = name.rpartition(".")
                head = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
                setattr(inner.get_submodule(parent), child, head)
        return model.merge_and_unload()

    def save(self, model: nn.Module, path: Path) -> None:
        """peft's format (`PeftModel.from_pretrained` loads it), plus peftlab's small json."""
        path = Path(path)
        model.save_pretrained(str(path))
        self._write_meta(model, path)

    def load(self, base_model: nn.Module, path: Path) -> nn.Module:
        """The adapter at path on base_model, for evaluation (eval mode, nothing trainable): peft
        refuses to reload a prompt-learning adapter as trainable."""
        hp, task = self._read_meta(Path(path))
        model = PeftModel.from_pretrained(base_model, str(path))
        model.peftlab_applied = Applied(self.name, hp, task)
        self._load_norm_statistics(model, path)
        return model.requires_grad_(False).eval()  # peft leaves a reloaded prompt table trainable


def targeted(model: nn.Module, config: PeftConfig) -> list[tuple[str, nn.Module]]:
    """The modules peft will adapt for this config, found with peft's own matching rules
    ("all-linear" expansion, head excluded through modules_to_save) on the unadapted model."""
    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    return [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(config, n)]
