"""Sparse updates chosen from the data: GPS (top-K input connections per output row by accumulated
gradient) and SPT (the globally most sensitive weights, with a LoRA where a matrix has many of them).

A selected update is stored as flat indices (a buffer) and values (the trainable tensor), never as a
dense masked copy, so the optimizer state and the saved adapter grow with the selection, not with
the model. Both calibrate on training batches after `apply`, before the first optimizer step.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from peftlab.errors import UserError

from .base import Calibration, HParam, TaskInfo
from .registry import register
from .wrapped import ALL_LINEAR, AdaptedLinear, LinearWrapping, linear_dims, lora_factors, target_names

SPARSE_TARGETS = HParam(
    "target_modules", list, ALL_LINEAR,
    "layers whose weights may be selected: names or dotted suffixes, or 'all-linear' (head excluded)",
    choices=(ALL_LINEAR,),
)
CALIBRATION_BATCHES = HParam(
    "calibration_batches", int, 32, "training batches (of training.batch_size) in the gradient pass before "
    "training", low=1, high=100_000)


class SparseLinear(AdaptedLinear):
    """W + a sparse update: `sparse_index` holds flat positions in W (row * d_in + column), the trained
    `sparse_values` what is added there (zero at init, so the layer starts as W)."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        self.set_entries(torch.zeros(0, dtype=torch.long))

    def set_entries(self, index: torch.Tensor) -> None:
        """Train these flat positions of W from zero."""
        W = self.base.weight
        self.register_buffer("sparse_index", index.to(device=W.device, dtype=torch.long))
        # An empty selection trains nothing (it gets no gradient and holds no optimizer state).
        self.sparse_values = nn.Parameter(torch.zeros(len(index), dtype=W.dtype, device=W.device),
                                          requires_grad=len(index) > 0)

    def delta(self) -> torch.Tensor:
        W = self.base.weight
        # A d_out x d_in temporary per step (no optimizer state for it): cheaper than gathering the
        # inputs of every selected entry once per token.
        return torch.zeros(W.numel(), dtype=W.dtype, device=W.device).index_add(
            0, self.sparse_index, self.sparse_values).view_as(W)

    def adapted_weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()


def _selected_layers(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def gradient_pass(model: nn.Module, layers: dict[str, AdaptedLinear], calibration: Calibration, batches: int,
                  loss_of: Callable[[nn.Module, dict], torch.Tensor],
                  accumulate: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over `batches` training batches of accumulate(dL/dW) for each layer's frozen W, in eval
    mode (no dropout noise); W is frozen again afterwards and nothing else is changed."""
    was_training = model.training
    model.eval()
    weights = {name: layer.base.weight for name, layer in layers.items()}
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for _ in range(batches):
            batch = {k: v.to(calibration.device) for k, v in next(calibration.batches).items()}
            grads = torch.autograd.grad(loss_of(model, batch), list(weights.values()), allow_unused=True)
            for (name, _), grad in zip(weights.items(), grads, strict=True):
                if grad is not None:
                    sums[name] += accumulate(grad.float())
    finally:
        for w in weights.values():
            w.requires_grad_(False)
        model.train(was_training)
    return sums


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. 2020: for each example, the mean log-probability of picking another example of
    its class among all others by cosine similarity / temperature; 0 for a batch without two of a class."""
    z = F.normalize(features.float(), dim=1)
    n = len(labels)
    own = torch.eye(n, dtype=torch.bool, device=z.device)
    similarity = (z @ z.T / temperature).masked_fill(own, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~own
    count = positives.sum(1)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    return -(log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / count[anchors]).mean()


class HeadFeatures:
    """What the head's first module receives, with its graph: the representation SupCon pulls apart."""

    def __init__(self, model: nn.Module, head: str) -> None:
        module = next(m for n, m in model.named_modules() if n == head or n.endswith("." + head))
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output) -> None:
        self.value = args[0]

    def pooled(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One row per example: a head that reads a sequence (RoBERTa's, a decoder's score) gets the mean
        over the example's real tokens."""
        value = self.value
        if value.dim() <= 2:
            return value
        if attention_mask is None or attention_mask.shape != value.shape[:2]:
            return value.mean(dim=1)
        weights = attention_mask.to(value.dtype).unsqueeze(-1)
        return (value * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def remove(self) -> None:
        self.handle.remove()


class SparseSelection(LinearWrapping):
    """A method that wraps every target layer, then picks its trained entries in a gradient pass."""

    mergeable = True
    identity_at_init = True
    sparse = True
    saved_frozen = ("sparse_index",)

    def _task_loss(self, model: nn.Module, hp: dict) -> Callable[[nn.Module, dict], torch.Tensor]:
        return lambda m, batch: m(**batch).loss

    def _layers(self, model: nn.Module) -> dict[str, SparseLinear]:
        return _selected_layers(model, self.layer)

    def structure(self, model: nn.Module) -> dict:
        return {name: int(layer.sparse_index.numel()) for name, layer in self._layers(model).items()}

    def restructure(self, model: nn.Module, structure: dict) -> None:
        for name, layer in self._layers(model).items():
            layer.set_entries(torch.zeros(int(structure.get(name, 0)), dtype=torch.long))


class GpsLinear(SparseLinear):
    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return hp["k"] * d_out


@register
class Gps(SparseSelection):
    name = "gps"
    summary = ("the top-K input connections of every output row of each target matrix, chosen by the gradient "
               "accumulated over training batches before training (sparse, mergeable), the targets' biases and the head")
    paper = "Zhang et al. 2024, Gradient-based Parameter Selection for Efficient Fine-Tuning, CVPR 2024"
    formula = "K*d_out + d_out (bias) per target layer + head"
    default_lr = 1e-3
    layer = GpsLinear
    hparams = (
        HParam("k", int, 2, "input connections trained per output row (K <= d_in of every target)", low=1,
               size=True),
        HParam("loss", str, "auto", "loss of the gradient pass: supcon (supervised contrastive on the "
               "representation the head reads, the paper's), ce (the task's own loss), or auto: supcon where "
               "the head reads one representation per example (classification), else ce",
               choices=("auto", "supcon", "ce")),
        HParam("temperature", float, 0.07, "SupCon temperature", low=0.0, open_low=True),
        CALIBRATION_BATCHES,
        SPARSE_TARGETS,
    )

    def _layer_problems(self, shapes: list[tuple[int, int]], hp: dict) -> list[str]:
        small = sorted({d_in for d_in, _ in shapes if hp["k"] > d_in})
        if small:
            return [f"k={hp['k']} exceeds the inputs (d_in) of target layers of width {small}; lower k"]
        return []

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problems = super()._problems(model, hp, task)
        if hp["loss"] == "supcon" and not self._supcon_fits(task):
            problems.append(f"loss supcon needs one representation per example at a task head's input; "
                            f"{task.type} tasks have none: use loss ce")
        return problems

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        super()._apply(model, hp, task)
        for layer in self._layers(model).values():
            layer.set_entries(torch.zeros(hp["k"] * layer.base.out_features, dtype=torch.long))
            if layer.base.bias is not None:
                layer.base.bias.requires_grad_(True)
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        modules = dict(model.named_modules())
        total = super()._count(model, hp, task)
        return total + sum(getattr(modules[n], "bias", None).numel() for n in target_names(model, hp["target_modules"], task)
                           if getattr(modules[n], "bias", None) is not None)

    @staticmethod
    def _supcon_fits(task: TaskInfo) -> bool:
        return "example_representation" in task.offers and bool(task.head_modules)

    def _uses_supcon(self, hp: dict, task: TaskInfo) -> bool:
        return hp["loss"] == "supcon" or (hp["loss"] == "auto" and self._supcon_fits(task))

    def calibrate(self, model: nn.Module, calibration: Calibration) -> dict[str, float]:
        applied = model.peftlab_applied
        hp, task = applied.hparams, applied.task
        supcon = self._uses_supcon(hp, task)
        if supcon:
            features = HeadFeatures(model, task.head_modules[0])

            def loss_of(m: nn.Module, batch: dict) -> torch.Tensor:
                m(**{k: v for k, v in batch.items() if k != "labels"})
                return supervised_contrastive(features.pooled(batch.get("attention_mask")), batch["labels"],
                                              hp["temperature"])
        else:
            loss_of = self._task_loss(model, hp)
        layers = self._layers(model)
        try:
            # |sum of gradients|: the paper accumulates gradients over the pass, then ranks by magnitude.
            sums = gradient_pass(model, layers, calibration, hp["calibration_batches"], loss_of, lambda g: g)
        finally:
            if supcon:
                features.remove()
        for name, layer in layers.items():
            d_in = layer.base.in_features
            columns = sums[name].abs().topk(hp["k"], dim=1).indices
            rows = torch.arange(columns.shape[0], device=columns.device)[:, None]
            layer.set_entries((rows * d_in + columns).flatten())
        return {"calibration/supcon": float(supcon)}


class SptLinear(SparseLinear):
    """SPT's layer: untouched, a sparse update of its sensitive entries, or a LoRA (s B A, B zero)."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        self.rank, self.scaling = 0, hp["alpha"] / hp["r"]

    def set_lora(self, r: int) -> None:
        W = self.base.weight
        self.rank = r
        self.lora_A, self.lora_B = lora_factors(W, r)
        self.set_entries(torch.zeros(0, dtype=torch.long))

    def adapted_weight(self) -> torch.Tensor:
        if self.rank:
            return self.base.weight + self.scaling * self.lora_B @ self.lora_A
        return super().adapted_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank:
            return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T
        if not len(self.sparse_index):
            return self.base(x)
        return super().forward(x)

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return 0  # decided by calibration; SPT counts its budget as a whole


def spt_split(sensitivities: list[torch.Tensor], lora_costs: list[int], thresholds: list[float],
              budget: int) -> tuple[list[torch.Tensor], list[bool]]:
    """Walk the weights from the most sensitive down, spending `budget` parameters: an entry of a
    matrix costs 1 while the matrix's selected count stays within its threshold; the entry that would
    pass it turns the matrix into a LoRA (its cost, minus the entries it already holds), and later
    entries of a LoRA matrix are free. An entry that no longer fits is passed over, so the walk spends
    the budget exactly where the weights allow. Returns each matrix's selected flat positions (empty
    for LoRA matrices) and which matrices are LoRA."""
    flat = torch.cat([s.flatten() for s in sensitivities])
    offsets = [0]
    for s in sensitivities:
        offsets.append(offsets[-1] + s.numel())
    chosen: list[list[int]] = [[] for _ in sensitivities]
    lora = [False] * len(sensitivities)
    closed = 0  # matrices that take nothing more: a LoRA, or full at their threshold with no LoRA affordable
    shut = [False] * len(sensitivities)
    spent = 0
    # Stable order: equal sensitivities are taken in position order, so the split is reproducible.
    order = torch.argsort(flat, descending=True, stable=True)
    for part in order.split(1 << 16):  # the walk usually ends early: no list of every weight
        for position in part.tolist():
            if spent >= budget:
                break
            i = bisect.bisect_right(offsets, position) - 1
            if shut[i]:
                continue
            if len(chosen[i]) + 1 > thresholds[i]:
                switch = lora_costs[i] - len(chosen[i])
                if spent + switch <= budget:
                    spent += switch
                    lora[i], chosen[i] = True, []
                # Either way it takes nothing more: the budget left only shrinks.
                shut[i], closed = True, closed + 1
                continue
            spent += 1
            chosen[i].append(position - offsets[i])
        if spent >= budget or closed == len(sensitivities):
            break
    return [torch.tensor(sorted(c), dtype=torch.long) for c in chosen], lora


@register
class Spt(SparseSelection):
    name = "spt"
    summary = ("the most sensitive weights (squared gradients summed over training batches) within one global "
               "budget: a LoRA on a matrix with many of them, its sensitive entries alone elsewhere; and the head")
    paper = "He et al. 2023, Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning, ICCV 2023"
    formula = ("params in all (sum of r*(d_in+d_out) over LoRA matrices + sensitive entries of the sparse ones) "
               "+ head")
    default_lr = 1e-3
    layer = SptLinear
    hparams = (
        HParam("params", int, 50_000, "trainable parameters outside the head (the global budget)", low=1,
               size=True),
        HParam("r", int, 8, "rank of the LoRA given to a matrix with many sensitive weights", low=1),
        HParam("alpha", float, 16, "LoRA scaled by alpha/r", low=0.0, open_low=True),
        HParam("lora_share", float, 0.1, "a matrix turns LoRA when its sensitive count exceeds this share of "
               "its LoRA's parameters r*(d_in+d_out)", low=0.0, open_low=True, high=1.0),
        CALIBRATION_BATCHES,
        SPARSE_TARGETS,
    )

    def _layer_problems(self, shapes: list[tuple[int, int]], hp: dict) -> list[str]:
        small = sorted({f"{d_out}x{d_in}" for d_in, d_out in shapes if hp["r"] > min(d_in, d_out)})
        if small:
            return [f"r={hp['r']} exceeds min(d_out, d_in) of target layers {small}; lower r"]
        # A matrix holds at most its threshold of sparse entries, or a LoRA that costs more: the most
        # the budget can buy is a LoRA on every target.
        room = sum(hp["r"] * (d_in + d_out) for d_in, d_out in shapes)
        if hp["params"] > room:
            return [f"params={hp['params']:,} exceeds the {room:,} that SPT can train on these targets (a LoRA "
                    f"of rank {hp['r']} on each); lower params or raise r"]
        return []

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return hp["params"]

    def structure(self, model: nn.Module) -> dict:
        return {name: ("lora" if layer.rank else int(layer.sparse_index.numel()))
                for name, layer in self._layers(model).items()}

    def restructure(self, model: nn.Module, structure: dict) -> None:
        r = model.peftlab_applied.hparams["r"]
        for name, layer in self._layers(model).items():
            kind = structure.get(name, 0)
            if kind == "lora":
                layer.set_lora(r)
            else:
                layer.set_entries(torch.zeros(int(kind), dtype=torch.long))

    def calibrate(self, model: nn.Module, calibration: Calibration) -> dict[str, float]:
        hp = model.peftlab_applied.hparams
        layers = self._layers(model)
        sums = gradient_pass(model, layers, calibration, hp["calibration_batches"], self._task_loss(model, hp),
                             lambda g: g.square())
        names = list(layers)
        costs = [hp["r"] * (layers[n].base.in_features + layers[n].base.out_features) for n in names]
        chosen, lora = spt_split([sums[n].cpu() for n in names], costs, [hp["lora_share"] * c for c in costs],
                                 hp["params"])
        for name, entries, as_lora in zip(names, chosen, lora, strict=True):
            if as_lora:
                layers[name].set_lora(hp["r"])
            else:
                layers[name].set_entries(entries)
        sparse = sum(len(c) for c in chosen)
        return {"calibration/lora_matrices": float(sum(lora)), "calibration/sparse_matrices":
                float(sum(1 for c, lo in zip(chosen, lora, strict=True) if len(c) and not lo)),
                "calibration/sparse_entries": float(sparse)}

