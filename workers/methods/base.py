"""The contract every PEFT method implements: hyperparameters, apply, params formula, merge, save/load.
The training loop and the spec validator reach a method only through this interface, never by name."""
from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import UserError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "peftlab_adapter.json"
NORM_STATISTICS = "peftlab_norm_statistics.safetensors"
"""Batch norms' running statistics, which move in training even where the norm itself is frozen,
so a reloaded adapter scores as its trial did; absent for models without batch norm."""
SIZE_SCAN_LIMIT = 4096  # sizes tried when the budget's size does not fit the model
_KINDS = {int: "an int", float: "a number", bool: "true or false", str: "a string", list: "a list of names"}


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its type, default, documentation and allowed values."""

    name: str
    kind: type
    """int, float, bool, str or list (a list of strings, e.g. module names)."""
    default: Any
    """None means "decided from the model" (the doc says how); None is then also accepted as a value."""
    doc: str
    low: float | None = None
    """Inclusive lower bound for numbers (exclusive when open_low)."""
    high: float | None = None
    """Inclusive upper bound for numbers."""
    choices: tuple | None = None
    """Allowed values for str; for list, the strings accepted in place of a list (e.g. "all-linear")."""
    size: bool = False
    """True for the hyperparameter that size_for_budget tunes."""
    open_low: bool = False
    """True when low itself is not allowed (a learning rate must be > 0)."""
    open_high: bool = False
    """True when high itself is not allowed (a share to remove must stay below 1)."""

    def check(self, value: Any) -> str | None:
        """A one-line problem with `value`, or None when it is acceptable."""
        if value is None and self.default is None:
            return None
        if self.kind is list:
            if isinstance(value, str) and self.choices and value in self.choices:
                return None
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                return None
            alt = f" or one of {list(self.choices)}" if self.choices else ""
            return f"{self.name}: expected a non-empty list of names{alt}, got {value!r}"
        is_bool = isinstance(value, bool)
        ok = {
            int: isinstance(value, int) and not is_bool,
            float: isinstance(value, (int, float)) and not is_bool,
            bool: is_bool,
            str: isinstance(value, str),
        }[self.kind]
        if not ok:
            return f"{self.name}: expected {_KINDS[self.kind]}, got {type(value).__name__} {value!r}"
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            bound = f"{'>' if self.open_low else '>='} {self.low}"
            return f"{self.name}: {value!r} is below the allowed range ({bound})"
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return f"{self.name}: {value!r} is above the allowed range ({'<' if self.open_high else '<='} {self.high})"
        if self.choices is not None and value not in self.choices:
            return f"{self.name}: {value!r} is not one of {list(self.choices)}"
        return None


@dataclass(frozen=True)
class TaskInfo:
    """What a method needs to know about the task: its type and which modules form the head."""

    type: str
    """The task type's registry name (workers/tasks)."""
    num_labels: int
    """0 for causal-lm."""
    head_modules: tuple[str, ...]
    """Names (from the model root) of the task head's modules, e.g. ("classifier",); always trained.
    Empty for causal-lm, whose LM head is pretrained."""

    @property
    def offers(self) -> frozenset[str]:
        """What the task type offers methods (keys of workers.tasks.base.OFFERS)."""
        from peftlab.workers.tasks import task_kind

        return task_kind(self.type).offers

    @property
    def peft_task_type(self) -> str | None:
        """peft's TaskType name for this task type's wrapper, or None for a plain PeftModel."""
        from peftlab.workers.tasks import task_kind

        return task_kind(self.type).peft_task_type


TARGET_MODULES = HParam(
    "target_modules", list, None,
    "layers to adapt: names or dotted suffixes (peft's matching), or 'all-linear' (head excluded); default: the "
    "architecture's query and value projections (query/value for BERT, q_proj/v_proj for ViT and Llama-style "
    "decoders, c_attn for GPT-2)",
    choices=("all-linear",),
)


def resolve_targets(model: nn.Module, targets: list[str] | str | None) -> list[str] | str | None:
    """The spec's targets, or the architecture's defaults where it names none (None: no default known)."""
    from peftlab.workers.architectures import default_targets

    if targets is None:
        return default_targets(model)
    return targets if isinstance(targets, str) else list(targets)


def not_found(target: str, model: nn.Module, candidates: list[str], kinds: str = "linear") -> str:
    """One line for a target name that matches no module: the nearest names first, then all of them."""
    import difflib

    close = difflib.get_close_matches(target.rsplit(".", 1)[-1], candidates, n=3, cutoff=0.5)
    hint = f"; nearest: {', '.join(close)}" if close else ""
    return (f"target module '{target}' not found in {type(model).__name__} (outside the head){hint}; "
            f"its {kinds} layers are named: {', '.join(candidates) or '(none)'}")


OPTIMIZER_HPARAMS: tuple[HParam, ...] = (
    HParam("lr", float, 1e-3, "AdamW learning rate (each method sets its own default)", low=0.0, open_low=True),
    HParam("weight_decay", float, 0.0, "AdamW weight decay", low=0.0),
)


@dataclass
class Calibration:
    """What a method that needs the data before training may read: the task's training batches
    (an endless seeded stream, model inputs with `labels`), its texts and tokenizer, and where
    the model came from (for a pre-training head)."""

    batches: Iterator[dict[str, torch.Tensor]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    texts: list[str] = field(default_factory=list)
    """The task's training texts (a corpus for a first stage); empty for images."""
    processor: Any = None
    """The tokenizer of text tasks."""
    model_name: Any = None
    """The model's name (registry alias, Hub id, path) or, for a model built from a config, that config."""
    seed: int = 0
    """The trial's seed, for what the method draws (a fresh head)."""
    max_length: int = 128
    """Tokens per text when the method encodes texts itself."""


@dataclass(frozen=True)
class Applied:
    """Recorded on a model by Method.apply, so that save() knows what produced it."""

    method: str
    hparams: dict
    task: TaskInfo

def norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every batch norm that training moved, by buffer name: those with
    trainable parameters, and frozen ones too unless the model keeps them in eval mode
    (`pins_frozen_norms`, as peftlab's CIFAR ResNets do)."""
    pinned = bool(getattr(model, "pins_frozen_norms", False))
    statistics = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if pinned and not any(p.requires_grad for p in module.parameters()):
            continue  # stayed in eval mode: unchanged
        for buffer, value in module.named_buffers(recurse=False):
            if value is not None:
                statistics[f"{name}.{buffer}"] = value.detach().contiguous()
    return statistics


class Method(ABC):
    """A PEFT method. Subclasses set the class variables and implement _apply and _count.

    Public calls accept hyperparameters as given by the user and resolve them; `apply` returns
    the model to train (possibly a wrapper; the argument may be changed in place).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line: what the method trains."""
    paper: ClassVar[str]
    formula: ClassVar[str]
    """Trainable parameters, human-readable, e.g. "r*(d_in+d_out) per target layer + head"."""
    mergeable: ClassVar[bool]
    identity_at_init: ClassVar[bool]
    near_identity_at_init: ClassVar[bool] = False
    """Not exactly the frozen model at init but within 1e-3 of it (Houlsby's tiny random weights)."""
    default_lr: ClassVar[float]
    hparams: ClassVar[tuple[HParam, ...]] = ()
    """Method-specific only; all_hparams() adds OPTIMIZER_HPARAMS."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the method adapts beyond linear layers, as task types offer it (keys of
    workers.tasks.base.OFFERS: a new head, token or patch inputs); whether it fits a model is the
    architecture's question (`_problems`: targets, blocks, layer kinds)."""
    quantizable: ClassVar[bool] = False
    """Trains on a k-bit quantized frozen base (QLoRA): its adapters wrap bitsandbytes layers."""
    sparse: ClassVar[bool] = False
    """Trains selected single weights: its size reaches a budget closely anywhere in its range, so a
    budget outside that range is refused rather than run off-budget."""
    saved_frozen: ClassVar[tuple[str, ...]] = ()
    """Name suffixes of tensors that belong to the adapter but do not train (a sparse method's
    selected indices, a first stage frozen for the second): saved and loaded with the trainable ones."""

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        """Freeze and inject; hp is resolved and check_applicable found no problem."""

    @abstractmethod
    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        """Trainable parameters excluding the head, from the formula and the unadapted model's shapes."""

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        """Method-specific reasons why it cannot apply to this model (resolved hp)."""
        return []

    # -- the contract -------------------------------------------------------------------------
    def all_hparams(self) -> dict[str, HParam]:
        out = {h.name: h for h in self.hparams}
        for h in OPTIMIZER_HPARAMS:
            out[h.name] = replace(h, default=self.default_lr) if h.name == "lr" else h
        return out

    def resolve(self, hparams: dict) -> dict:
        """Defaults filled in; every unknown key or bad value reported together in one UserError."""
        known = self.all_hparams()
        problems = [
            f"unknown hyperparameter '{k}'; known: {', '.join(known)}" for k in hparams if k not in known
        ]
        problems += [p for k, v in hparams.items() if k in known and (p := known[k].check(v))]
        if problems:
            raise UserError("; ".join(problems), where=f"method {self.name}")
        return {k: copy.deepcopy(hparams.get(k, h.default)) for k, h in known.items()}

    def check_applicable(self, model: nn.Module, hparams: dict, task: TaskInfo) -> list[str]:
        """Problems that stop this method on this model and task; reads only module names and
        shapes, so a model on the "meta" device will do."""
        try:
            hp = self.resolve(hparams)
        except UserError as e:
            return [str(e)]
        if lacking := self.needs - task.offers:
            return [self.refusal(task, lacking)]
        names = dict(model.named_modules())
        missing = [h for h in task.head_modules if h not in names]
        if missing or (not task.head_modules and "new_head" in task.offers):
            top = ", ".join(n for n, _ in model.named_children())
            what = f"head module(s) {missing} not found" if missing else "the task names no head module"
            return [f"{what} in {type(model).__name__}; its top-level modules: {top}"]
        return self._problems(model, hp, task)

    def refusal(self, task: TaskInfo, lacking: frozenset[str]) -> str:
        """Why the task type cannot host this method, and which methods it can."""
        from peftlab.workers.tasks.base import OFFERS

        from .registry import all_methods

        works = [m.name for m in all_methods().values() if m.needs <= task.offers and m.name != self.name]
        what = ", ".join(OFFERS[k] for k in sorted(lacking))
        return (f"method {self.name} needs {what}, which {task.type} tasks do not offer; "
                f"methods that run there: {', '.join(works)}")

    def apply(self, model: nn.Module, hparams: dict, task: TaskInfo) -> nn.Module:
        """Freeze the model, inject the method's parameters, keep the head trainable."""
        hp = self.resolve(hparams)
        problems = self.check_applicable(model, hp, task)
        if problems:
            raise UserError("; ".join(problems), where=f"method {self.name}")
        adapted = self._apply(model, hp, task)
        adapted.peftlab_applied = Applied(self.name, hp, task)
        return adapted

    def expected_trainable(self, model: nn.Module, hparams: dict, task: TaskInfo) -> int:
        """Trainable parameters after apply (head included), computed from the unadapted model."""
        return self._count(model, self.resolve(hparams), task) + head_param_count(model, task)

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"method {self.name} is not mergeable")

    def on_step(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Called by the training loop after each optimizer step, before gradients are cleared
        (`step` counts from 1 to max_steps): for methods that reshape themselves as they train."""

    # -- methods that need the data or change the model's structure ----------------------------
    @property
    def calibrates(self) -> bool:
        """Whether the method reads the training data before training (it implements `calibrate`)."""
        return type(self).calibrate is not Method.calibrate

    @property
    def prunes(self) -> bool:
        """Whether the method removes parts of the model while it trains (it implements `prune`)."""
        return type(self).prune is not Method.prune

    def calibrate(self, model: nn.Module, calibration: Calibration) -> dict[str, float]:
        """Before training, after apply: read training batches (gradients, sensitivities) or train a
        first stage, and fix what the model trains from them. Returns figures worth reporting
        (selected shares...), by name. Its time counts as the trial's calibration time."""
        return {}

    def data_problems(self, hparams: dict, texts: list[str]) -> list[str]:
        """Problems with what the method would read from the task's training texts (`Calibration.texts`),
        found before anything runs."""
        return []

    def prune_step(self, model: nn.Module, max_steps: int) -> int | None:
        """The optimizer step after which `prune` runs; None: never."""
        return None

    def prune(self, model: nn.Module) -> dict[str, float]:
        """Remove parts of the model (and of the method) for good, so it is really smaller; returns
        the fractions removed by name. The loop then trains what is left with a new optimizer."""
        return {}

    def structure(self, model: nn.Module) -> dict | None:
        """What calibration or pruning decided that `apply` alone cannot rebuild (selected entries,
        pruned heads), as plain JSON; None when there is nothing."""
        return None

    def restructure(self, model: nn.Module, structure: dict) -> None:
        """Give a freshly applied model the `structure` another one had (a reload, a resumed trial)."""

    def save(self, model: nn.Module, path: Path) -> None:
        """The trainable tensors as safetensors plus a json naming method, hyperparameters and task."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tensors.update({n: t.detach().contiguous() for n, t in model.state_dict().items()
                        if self.saved_frozen and n.endswith(self.saved_frozen)})
        save_file(tensors, str(path / ADAPTER_WEIGHTS))
        self._write_meta(model, path)

    def load(self, base_model: nn.Module, path: Path) -> nn.Module:
        """The saved adapter on base_model, for evaluation: eval mode, nothing trainable."""
        from safetensors.torch import load_file

        path = Path(path)
        hp, task = self._read_meta(path)
        model = self.apply(base_model, hp, task)
        if (structure := json.loads((path / ADAPTER_META).read_text()).get("structure")) is not None:
            self.restructure(model, structure)
        unexpected = model.load_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"adapter at {path} does not fit this model: unexpected tensors {unexpected[:5]}")
        self._load_norm_statistics(model, path)
        return model.requires_grad_(False).eval()

    def _write_meta(self, model: nn.Module, path: Path) -> None:
        """peftlab's json beside every saved adapter, and the batch norms' statistics."""
        from safetensors.torch import save_file

        applied: Applied = model.peftlab_applied
        meta = {"method": applied.method, "hparams": applied.hparams, "task": asdict(applied.task)}
        if (structure := self.structure(model)) is not None:
            meta["structure"] = structure
        (path / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        statistics = norm_statistics(model)
        if statistics:
            save_file(statistics, str(path / NORM_STATISTICS))

    @staticmethod
    def _load_norm_statistics(model: nn.Module, path: Path) -> None:
        from safetensors.torch import load_file

        if (Path(path) / NORM_STATISTICS).is_file():
            buffers = dict(model.named_buffers())
            with torch.no_grad():
                for name, value in load_file(str(Path(path) / NORM_STATISTICS)).items():
                    if name not in buffers:
                        raise UserError(f"adapter at {path} does not fit this model: no buffer {name}")
                    buffers[name].copy_(value)

    def _read_meta(self, path: Path) -> tuple[dict, TaskInfo]:
        meta = json.loads((path / ADAPTER_META).read_text())
        if meta["method"] != self.name:
            raise UserError(f"adapter at {path} was saved by method '{meta['method']}', not '{self.name}'")
        task = meta["task"]
        return meta["hparams"], TaskInfo(task["type"], task["num_labels"], tuple(task["head_modules"]))

    def size_for_budget(self, model: nn.Module, hparams: dict, task: TaskInfo, budget: int) -> dict:
        """Resolved hparams with the size hyperparameter set so expected_trainable is closest to budget
        (ties go to the smaller size)."""
        size = next((h for h in self.hparams if h.size), None)
        if size is None:
            raise UserError(
                f"method {self.name} has no size hyperparameter; its trainable count is fixed "
                f"({self.formula}), so it cannot be sized to a budget"
            )
        hp = self.resolve(hparams)

        def count(v: int) -> int:
            return self._count(model, {**hp, size.name: v}, task)

        budget -= head_param_count(model, task)
        lo, hi = int(size.low or 1), int(size.high or 2**31)
        # The count grows with the size: bracket the budget by doubling, then bisect.
        top = lo
        while top < hi and count(top) < budget:
            top = min(2 * top, hi)
        left, right = max(lo, top // 2), top
        while left < right:
            mid = (left + right) // 2
            left, right = (mid + 1, right) if count(mid) < budget else (left, mid)
        best = min({max(lo, left - 1), left}, key=lambda v: (abs(count(v) - budget), v))
        if self._problems(model, {**hp, size.name: best}, task):
            # Not every size fits every model (block sizes must divide layers, ranks stay below
            # a layer's dimensions): take the closest size that does.
            fitting = [v for v in range(lo, min(hi, SIZE_SCAN_LIMIT) + 1)
                       if not self._problems(model, {**hp, size.name: v}, task)]
            if not fitting:
                raise UserError(f"no {size.name} fits every target layer of {type(model).__name__}",
                                where=f"method {self.name}")
            best = min(fitting, key=lambda v: (abs(count(v) - budget), v))
        return {**hp, size.name: best}


def in_head(param_name: str, task: TaskInfo) -> bool:
    return any(param_name == h or param_name.startswith(h + ".") for h in task.head_modules)


def head_param_count(model: nn.Module, task: TaskInfo) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if in_head(n, task))
