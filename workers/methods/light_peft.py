"""Light-PEFT (Gu et al. 2024): an early estimation stage, then pruning for real, then training on.

During the estimation stage the model trains a LoRA on the target layers together with one mask per
attention head (per key/value group under grouped-query attention) and one per FFN neuron of every
block, under an L1 penalty on the masks that a hook adds to the model's training loss. After
`estimation_steps` optimizer steps `prune` removes the heads and neurons with the smallest |mask|
(globally, keeping one of each per block) by slicing the weights of their projections, drops the LoRA
modules whose updates moved their layer's output least (||dW x|| / ||W x + b|| per token) back to the
frozen layer, and cuts the least important ranks of the others (first-order mean |A * dL/dA| +
mean |B * dL/dB| per rank), both estimated over the second half of the stage as the authors' code
does. The masks go
with the pruning: the kept heads and neurons carry on unscaled (mask 1), as in the authors' code, so
the pruned model computes exactly what the unpruned one computes with its masks set to 1 for kept and
0 for removed units and the removed LoRA ranks and modules zeroed (`binary_masks` makes that model).

What pruning decided is the method's `structure` (kept heads and neurons per block, kept ranks per
LoRA module, plain JSON): a saved adapter or a resumed trial re-cuts a fresh base model from it, so
the adapter itself holds only the trainable tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peftlab.errors import UserError
from peftlab.workers.architectures import ARCHITECTURES, UnitLayout, architecture, blocks, describe

from .base import TARGET_MODULES, HParam, TaskInfo
from .registry import register
from .spectral import RankedWrapping
from .wrapped import AdaptedLinear, LinearWrapping, linear_dims, lora_factors

MASK = "light_peft_mask"
"""The parameter, on the projection that reads the masked units, behind each mask: mask = 1 + lr_scale * it
(see `_Faster`)."""
DEFAULT_ESTIMATION_SHARE = 0.2


class LightLoraLinear(AdaptedLinear):
    """y = W x + b + (alpha / r) B A x, B zero and A Kaiming-uniform at init; while estimating it also sums
    its importances (buffers, so a checkpoint keeps them): per rank from the gradients (`take_step`),
    and ||dW x|| / ||W x + b|| per token (the frozen layer's output, as the authors' code divides by),
    averaged over the real tokens of each training forward."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        W, r = base.weight, hp["r"]
        self.scaling = hp["alpha"] / r  # kept when ranks are cut: the kept ranks' update stays as it was
        self.dropout = nn.Dropout(hp["dropout"]) if hp["dropout"] else nn.Identity()
        self.lora_A, self.lora_B = lora_factors(W, r)
        self.positions: _Positions | None = None
        for name, shape in (("rank_importance", (r,)), ("module_importance", ()), ("step_importance", ())):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=W.device))

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def estimating(self) -> bool:
        return "module_importance" in self._buffers

    def adapted_weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        if self.training and self.estimating:
            self._record(y, delta)
        return y + delta

    @torch.no_grad()
    def _record(self, y: torch.Tensor, delta: torch.Tensor) -> None:
        ratio = delta.float().norm(dim=-1) / y.float().norm(dim=-1).clamp_min(1e-12)
        mask = self.positions.mask if self.positions is not None else None
        if mask is not None and mask.numel() == ratio.numel():
            real = mask.reshape(ratio.shape).to(device=ratio.device, dtype=ratio.dtype)
            value = (ratio * real).sum() / real.sum().clamp_min(1.0)
        else:
            value = ratio.mean()
        self.step_importance += torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def take_step(self, counted: bool) -> None:
        """After an optimizer step (gradients still there): add this step's importances if `counted`."""
        if counted:
            A, B = self.lora_A, self.lora_B
            if A.grad is not None and B.grad is not None:
                # |A * grad A| + |B * grad B| per rank (AdaLoRA's sensitivity): entries of opposite sign add up.
                taylor = (A * A.grad).float().abs().mean(1) + (B * B.grad).float().abs().mean(0)
                self.rank_importance += torch.nan_to_num(taylor, nan=0.0, posinf=0.0, neginf=0.0)
            self.module_importance += self.step_importance
        self.step_importance.zero_()

    def stop_estimating(self) -> None:
        for name in ("rank_importance", "module_importance", "step_importance"):
            self._buffers.pop(name, None)
        self.positions = None

    def keep_ranks(self, index: torch.Tensor) -> None:
        """Keep only these ranks (rows of A, columns of B)."""
        A, B = self.lora_A, self.lora_B
        index = index.to(A.device)
        self.lora_A = nn.Parameter(A.detach().index_select(0, index).clone(), requires_grad=A.requires_grad)
        self.lora_B = nn.Parameter(B.detach().index_select(1, index).clone(), requires_grad=B.requires_grad)
        if "rank_importance" in self._buffers:
            self.rank_importance = self.rank_importance.index_select(0, index)

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return hp["r"] * (d_in + d_out)


class _Positions:
    """The attention mask of the training batch in flight, which the LoRA layers read to average their
    output ratio over real tokens; set by a hook on the model, shared by its LoRA layers."""

    mask: torch.Tensor | None = None


# -- hooks (module-level functions, so a model copies and pickles with them) -------------------------------
class _Faster(torch.autograd.Function):
    """mask = 1 + scale * theta, with theta's gradient taken as the mask's own: an optimizer step on theta
    then moves the mask `scale` times as far as the same step on the mask would, whatever the optimizer
    (the authors' larger learning rate for the masks, in a loop with one learning rate), and gradient
    clipping sees the masks' gradients as they are."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, scale: float) -> torch.Tensor:
        return 1.0 + scale * theta

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def mask_values(module: nn.Module) -> torch.Tensor:
    """The masks a module's input is scaled by, one per unit (head or key/value group, or neuron)."""
    return _Faster.apply(getattr(module, MASK), module.light_peft_lr_scale)


def _masked_input(module: nn.Module, args: tuple):
    if MASK not in module._parameters:
        return None
    x = args[0]
    scale = mask_values(module).to(x.dtype).repeat_interleave(module.light_peft_unit)
    return (x * scale, *args[1:])


def _remember_positions(model: nn.Module, args: tuple, kwargs: dict):
    holder = getattr(model, "light_peft_positions", None)
    if holder is not None:
        holder.mask = kwargs.get("attention_mask") if model.training else None
    return None


def _add_penalty(model: nn.Module, args: tuple, output):
    """The L1 penalty on the masks, added to the training loss (the model's own, so the loop needs no
    change); evaluation losses stay the task's."""
    holder = getattr(model, "light_peft_positions", None)
    if holder is not None:
        holder.mask = None
    loss = getattr(output, "loss", None)
    if not model.training or loss is None:
        return None
    masks = [mask_values(m).abs().sum() for m in model.modules() if MASK in m._parameters]
    if not masks:
        return None
    output.loss = loss + model.light_peft_l1 * torch.stack(masks).sum().to(loss.dtype)
    return output


def _unhook(module: nn.Module, fn) -> None:
    for registry in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in list(registry.items()):
            if hook is fn:
                del registry[key]
                for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    extra.pop(key, None)


# -- the model's heads and neurons -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One transformer block's units before pruning."""

    name: str
    heads: int
    """Query heads."""
    groups: int
    """Key/value heads: the head mask's units (a group of heads/groups query heads sharing them)."""
    head_dim: int
    neurons: int

    @property
    def group_size(self) -> int:
        return self.heads // self.groups


def _dims(module: nn.Module) -> tuple[int, int] | None:
    return linear_dims(module.base if isinstance(module, AdaptedLinear) else module)


def _paths(units: UnitLayout) -> list[str]:
    return [p for p in (units.query, units.key, units.value, units.attention_out, *units.ffn_up, units.ffn_down)
            if p is not None]


def _layout_problem(model: nn.Module, task: TaskInfo) -> str | None:
    found = architecture(model)
    if found is None or found.units is None:
        known = ", ".join(t for a in ARCHITECTURES if a.units is not None for t in a.model_types)
        return (f"method light_peft prunes attention heads and FFN neurons, whose layout the architecture table "
                f"knows for {known}, not for {describe(model)}")
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    groups = getattr(config, "num_key_value_heads", None) or heads
    if not heads or heads % groups:
        return f"method light_peft: {describe(model)} has {heads} attention heads over {groups} key/value heads"
    found_blocks = blocks(model, skip=task.head_modules)
    if not found_blocks:
        return f"method light_peft found no transformer blocks in {describe(model)} to prune"
    for name, block in found_blocks:
        for path in _paths(found.units):
            try:
                dims = _dims(block.get_submodule(path))
            except AttributeError:
                dims = None
            if dims is None:
                return f"method light_peft: block {name} of {describe(model)} has no linear layer {path}"
    return None


def _blocks(model: nn.Module, task: TaskInfo) -> list[_Block]:
    units = architecture(model).units
    config = model.config
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    found = []
    for name, block in blocks(model, skip=task.head_modules):
        width = _dims(block.get_submodule(units.query))[1] // (3 if units.key is None else 1)
        found.append(_Block(name, heads, groups, width // heads, _dims(block.get_submodule(units.ffn_down))[0]))
    return found


def _spans(units: list[int], width: int, device: torch.device) -> torch.Tensor:
    """The positions of these units, each `width` wide, laid side by side."""
    index = torch.tensor(units, dtype=torch.long, device=device)
    return (index[:, None] * width + torch.arange(width, device=device)).flatten()


def _cut(module: nn.Module, index: torch.Tensor, outputs: bool) -> None:
    """Keep only these outputs (or inputs) of a linear layer, its LoRA's rows of B (or columns of A) too."""
    if isinstance(module, LightLoraLinear):
        _cut(module.base, index, outputs)
        name, dim = ("lora_B", 0) if outputs else ("lora_A", 1)
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(old.detach().index_select(dim, index.to(old.device)).clone(),
                                           requires_grad=old.requires_grad))
        return
    conv = isinstance(module, Conv1D)  # its weight is stored d_in x d_out
    weight = module.weight
    index = index.to(weight.device)
    dim = (1 if outputs else 0) if conv else (0 if outputs else 1)
    module.weight = nn.Parameter(weight.detach().index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if outputs and module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach().index_select(0, index).clone(),
                                   requires_grad=module.bias.requires_grad)
    attribute = ("nf" if outputs else "nx") if conv else ("out_features" if outputs else "in_features")
    setattr(module, attribute, len(index))


def _set(block: nn.Module, dotted: str, value: int) -> None:
    owner_path, _, attribute = dotted.rpartition(".")
    owner = block.get_submodule(owner_path) if owner_path else block
    if hasattr(owner, attribute):
        setattr(owner, attribute, value)


def _cut_block(model: nn.Module, block: _Block, units: UnitLayout, kept_groups: list[int],
               kept_neurons: list[int]) -> None:
    module = model.get_submodule(block.name)
    device = _weight(module.get_submodule(units.attention_out)).device
    if len(kept_groups) < block.groups:
        g, dh = block.group_size, block.head_dim
        query = _spans(kept_groups, g * dh, device)  # a group's query heads lie side by side
        if units.key is None:  # fused [queries | keys | values]
            width = block.heads * dh
            _cut(module.get_submodule(units.query), torch.cat([query, query + width, query + 2 * width]), True)
        else:
            _cut(module.get_submodule(units.query), query, True)
            for path in (units.key, units.value):
                _cut(module.get_submodule(path), _spans(kept_groups, dh, device), True)
        _cut(module.get_submodule(units.attention_out), query, False)
        for attribute in units.head_counts:
            _set(module, attribute, len(kept_groups) * g)
        for attribute in units.head_widths:
            _set(module, attribute, len(kept_groups) * g * dh)
    if len(kept_neurons) < block.neurons:
        index = torch.tensor(kept_neurons, dtype=torch.long, device=device)
        for path in units.ffn_up:
            _cut(module.get_submodule(path), index, True)
        _cut(module.get_submodule(units.ffn_down), index, False)
        for attribute in units.ffn_widths:
            _set(module, attribute, len(kept_neurons))


def _weight(module: nn.Module) -> torch.Tensor:
    return module.base.weight if isinstance(module, AdaptedLinear) else module.weight


def _nearest(x: float) -> int:
    return math.floor(x + 0.5)


def keep_lowest_out(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """Per group, the indices kept when the round(ratio x all) lowest-scoring units of all groups together
    are removed, a group never losing its last unit (ties go in group, then index order)."""
    sizes = {name: len(s) for name, s in scores.items()}
    total = sum(sizes.values())
    remove = min(_nearest(ratio * total), total - len(sizes))
    order = sorted((score, g, i) for g, s in enumerate(scores.values()) for i, score in enumerate(s.tolist()))
    names, left = list(scores), dict(sizes)
    removed: dict[str, set[int]] = {name: set() for name in names}
    for _, g, i in order:
        if remove <= 0:
            break
        if left[names[g]] > 1:
            removed[names[g]].add(i)
            left[names[g]] -= 1
            remove -= 1
    return {name: [i for i in range(sizes[name]) if i not in removed[name]] for name in names}


def binary_masks(model: nn.Module, structure: dict) -> None:
    """Make an unpruned model (estimation stage) compute what `structure`'s pruned model computes: masks
    1 for kept heads and neurons and 0 for removed ones, removed LoRA ranks and modules zeroed (B)."""
    units = architecture(model).units
    with torch.no_grad():
        for path, key in ((units.attention_out, "heads"), (units.ffn_down, "neurons")):
            for block, kept_units in structure[key].items():
                module = model.get_submodule(f"{block}.{path}")
                mask = getattr(module, MASK)
                kept = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
                kept[kept_units] = True
                mask.copy_(torch.where(kept, 0.0, -1.0 / module.light_peft_lr_scale))
        for name, ranks in structure["lora"].items():
            layer = model.get_submodule(name)
            kept = torch.zeros(layer.rank, dtype=torch.bool, device=layer.lora_B.device)
            if ranks is not None:
                kept[ranks] = True
            layer.lora_B.mul_(kept.to(layer.lora_B.dtype))


@register
class LightPeft(RankedWrapping):
    name = "light_peft"
    summary = ("LoRA plus L1-regularised masks on attention heads and FFN neurons for an early estimation stage; "
               "then the lowest-mask heads and neurons are cut out of the frozen model and the least important "
               "LoRA modules and ranks dropped, and the smaller model trains on; and the head")
    paper = ("Gu et al. 2024, Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning, "
             "Findings of ACL 2024")
    formula = ("r*(d_in+d_out) per target layer + one mask per attention head (per key/value group under "
               "grouped-query attention) and per FFN neuron of every block + head, before pruning")
    mergeable = True
    identity_at_init = True
    default_lr = 5e-4
    layer = LightLoraLinear
    hparams = (
        HParam("r", int, 8, "LoRA rank before pruning", low=1, size=True),
        HParam("alpha", float, 16, "LoRA scaled by alpha/r (r before pruning)", low=0.0, open_low=True),
        HParam("dropout", float, 0.05, "dropout on the LoRA's input", low=0.0, high=1.0),
        TARGET_MODULES,
        HParam("estimation_steps", int, None, "optimizer steps of the estimation stage, after which heads, neurons "
               f"and LoRA modules and ranks are pruned; default {DEFAULT_ESTIMATION_SHARE:.0%} of "
               "training.max_steps (at least 1, at most max_steps)", low=1),
        HParam("l1", float, 1e-4, "lambda of the penalty lambda * sum |mask| added to the training loss while "
               "estimating", low=0.0),
        HParam("head_mask_lr_scale", float, 100.0, "the head masks' learning rate is this many times the rest's "
               "(the authors' factor; a mask is 1 + scale * a parameter that starts at 0 and takes the mask's "
               "gradient)", low=0.0, open_low=True),
        HParam("neuron_mask_lr_scale", float, 50.0, "the same factor for the FFN neuron masks", low=0.0,
               open_low=True),
        HParam("head_ratio", float, 1 / 3, "share of all attention heads removed (lowest |mask| first, over all "
               "blocks, each block keeping one; whole key/value groups under grouped-query attention)",
               low=0.0, high=1.0, open_high=True),
        HParam("neuron_ratio", float, 1 / 3, "share of all FFN neurons removed (lowest |mask| first, over all "
               "blocks, each block keeping one)", low=0.0, high=1.0, open_high=True),
        HParam("module_ratio", float, 0.75, "share of the LoRA modules dropped (lowest mean ||dW x|| / ||W x|| "
               "first; one is kept)", low=0.0, high=1.0, open_high=True),
        HParam("rank_ratio", float, 0.5, "share of the kept modules' LoRA ranks cut (lowest first-order "
               "importance first, over all modules, each keeping one)", low=0.0, high=1.0, open_high=True),
    )

    # -- applicability and the formula -----------------------------------------------------------------
    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problem = _layout_problem(model, task)
        return [problem] if problem else super()._problems(model, hp, task)

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return super()._count(model, hp, task) + sum(b.groups + b.neurons for b in _blocks(model, task))

    # -- apply -----------------------------------------------------------------------------------------
    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        super()._apply(model, hp, task)
        positions = _Positions()
        for layer in self._layers(model).values():
            layer.positions = positions
        units = architecture(model).units
        for block in _blocks(model, task):
            module = model.get_submodule(block.name)
            self._add_mask(module.get_submodule(units.attention_out), block.groups, block.group_size * block.head_dim,
                           hp["head_mask_lr_scale"])
            self._add_mask(module.get_submodule(units.ffn_down), block.neurons, 1, hp["neuron_mask_lr_scale"])
        model.light_peft_positions = positions
        model.light_peft_l1 = hp["l1"]
        model.register_forward_pre_hook(_remember_positions, with_kwargs=True)
        model.register_forward_hook(_add_penalty)
        return model

    @staticmethod
    def _add_mask(module: nn.Module, units: int, width: int, lr_scale: float) -> None:
        """Masks on `units` slices, each `width` wide, of the module's input; kept in fp32 whatever the
        model's dtype, where a small step would not register on a half-precision 1."""
        device = _weight(module).device
        module.register_parameter(MASK, nn.Parameter(torch.zeros(units, dtype=torch.float32, device=device)))
        module.light_peft_unit = width
        module.light_peft_lr_scale = lr_scale
        module.register_forward_pre_hook(_masked_input)

    @staticmethod
    def _layers(model: nn.Module) -> dict[str, LightLoraLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, LightLoraLinear)}

    # -- the estimation stage ----------------------------------------------------------------------------
    def prune_step(self, model: nn.Module, max_steps: int) -> int:
        """The estimation stage's last step: estimation_steps, or its default share of max_steps, within
        [1, max_steps]."""
        steps = model.peftlab_applied.hparams["estimation_steps"]
        if steps is None:
            steps = _nearest(DEFAULT_ESTIMATION_SHARE * max_steps)
        return max(1, min(int(steps), max_steps))

    def on_step(self, model: nn.Module, step: int, max_steps: int) -> None:
        """While estimating: count this step's LoRA importances if it is in the second half of the stage."""
        layers = [layer for layer in self._layers(model).values() if layer.estimating]
        if not layers:
            return
        at = self.prune_step(model, max_steps)
        counted = at // 2 < step <= at  # the second half of the stage, as the authors average it
        for layer in layers:
            layer.take_step(counted)

    # -- pruning ---------------------------------------------------------------------------------------
    def structure(self, model: nn.Module) -> dict | None:
        """None before pruning; then {"heads": {block: kept heads (key/value groups under grouped-query
        attention)}, "neurons": {block: kept FFN neurons}, "lora": {target: kept ranks, or None if dropped}}."""
        return getattr(model, "light_peft_structure", None)

    def prune(self, model: nn.Module) -> dict[str, float]:
        """Choose from the masks and importances, then cut; the shares removed (the LoRA ranks' of the
        kept modules), and of all the model's parameters."""
        if self.structure(model) is not None:
            raise RuntimeError("light_peft: this model has been pruned already")
        applied = model.peftlab_applied
        hp, units = applied.hparams, architecture(model).units
        found = _blocks(model, applied.task)

        def masks(path: str) -> dict[str, torch.Tensor]:
            return {b.name: mask_values(model.get_submodule(f"{b.name}.{path}")).detach().abs().cpu() for b in found}

        heads = keep_lowest_out(masks(units.attention_out), hp["head_ratio"])
        neurons = keep_lowest_out(masks(units.ffn_down), hp["neuron_ratio"])
        layers = self._layers(model)
        names = list(layers)
        kept_modules = keep_lowest_out({"": torch.stack([layers[n].module_importance.cpu() for n in names])},
                                       hp["module_ratio"])[""]
        ranks = keep_lowest_out({names[i]: layers[names[i]].rank_importance.cpu() for i in kept_modules},
                                hp["rank_ratio"])
        structure = {"heads": heads, "neurons": neurons, "lora": {n: ranks.get(n) for n in names}}

        before = sum(p.numel() for p in model.parameters())
        ranks_before = sum(layers[n].rank for n in ranks)
        self._reshape(model, structure, found)
        after = sum(p.numel() for p in model.parameters())
        return {
            "pruning/heads": 1 - sum(map(len, heads.values())) / sum(b.groups for b in found),
            "pruning/neurons": 1 - sum(map(len, neurons.values())) / sum(b.neurons for b in found),
            "pruning/lora_modules": 1 - len(kept_modules) / len(names) if names else 0.0,
            "pruning/lora_ranks": 1 - sum(map(len, ranks.values())) / ranks_before if ranks_before else 0.0,
            "pruning/model_params": 1 - after / before,
        }

    def restructure(self, model: nn.Module, structure: dict) -> None:
        applied = model.peftlab_applied
        found = _blocks(model, applied.task)
        layers = self._layers(model)
        fits = (set(structure.get("heads", {})) == set(structure.get("neurons", {})) == {b.name for b in found}
                and set(structure.get("lora", {})) == set(layers)
                and all(max(kept, default=-1) < b.groups for b in found for kept in [structure["heads"][b.name]])
                and all(max(kept, default=-1) < b.neurons for b in found for kept in [structure["neurons"][b.name]])
                and all(r is None or max(r, default=-1) < layers[n].rank for n, r in structure["lora"].items()))
        if not fits:
            raise UserError(f"light_peft: the pruned structure does not fit this {describe(model)} (other blocks, "
                            "sizes or LoRA targets)")
        self._reshape(model, structure, found)

    def _reshape(self, model: nn.Module, structure: dict, found: list[_Block]) -> None:
        """Cut a model fresh from the estimation stage to `structure`: masks, hooks and importances go."""
        self._remove_masks(model)
        units = architecture(model).units
        for block in found:
            _cut_block(model, block, units, structure["heads"][block.name], structure["neurons"][block.name])
        for name, layer in self._layers(model).items():
            ranks = structure["lora"][name]
            if ranks is None:  # dropped: the frozen layer (GPT-2's Conv1D as the equal nn.Linear)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.base)
                continue
            if len(ranks) < layer.rank:
                layer.keep_ranks(torch.tensor(ranks, dtype=torch.long))
            layer.stop_estimating()
        model.light_peft_structure = structure

    @staticmethod
    def _remove_masks(model: nn.Module) -> None:
        for module in model.modules():
            if MASK in module._parameters:
                del module._parameters[MASK]
                del module.light_peft_unit, module.light_peft_lr_scale
                _unhook(module, _masked_input)
        _unhook(model, _remember_positions)
        _unhook(model, _add_penalty)
        for attribute in ("light_peft_positions", "light_peft_l1"):
            if attribute in model.__dict__:
                delattr(model, attribute)

    # -- merge -----------------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        """Every LoRA into its layer; before pruning, each mask into the input columns of the layer it scales."""
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                plain = module.plain() if isinstance(module, LightLoraLinear) else module
                if MASK in module._parameters:
                    scale = mask_values(module).repeat_interleave(module.light_peft_unit)
                    weight = plain.weight
                    weight.copy_(weight * (scale[:, None] if isinstance(plain, Conv1D) else scale).to(weight.dtype))
                    if plain is module:
                        del module._parameters[MASK]
                        del module.light_peft_unit, module.light_peft_lr_scale
                        _unhook(module, _masked_input)
                if plain is not module:
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, plain)
        self._remove_masks(model)
        return model
