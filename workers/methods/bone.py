"""Bone / BAT through peft's MissConfig (peft renamed Bone to MiSS): block updates of size b, b * d_out per layer.
`bone` is the paper's BAT ("Weight Guide", init_weights="bat"); `bone_simple` is peft's default MiSS shard."""
from __future__ import annotations

from typing import ClassVar

from peft import MissConfig
from torch import nn

from .base import TARGET_MODULES, HParam, TaskInfo, resolve_targets
from .peft_backed import PeftMethod, peft_task_type, targeted
from .registry import register


class _Miss(PeftMethod):
    """Shared body; subclasses pick peft's init_weights and which dimensions the block size must divide."""

    init_weights: ClassVar[bool | str]
    divides_d_out: ClassVar[bool]
    mergeable = True
    identity_at_init = True  # B starts at zero in both variants
    default_lr = 3e-4
    formula = "block_size*d_out per target layer + head"
    hparams = (
        HParam("block_size", int, 64, "block size b (peft's r)", low=1, size=True),
        TARGET_MODULES,
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> MissConfig:
        targets = resolve_targets(model, hp["target_modules"]) or []
        return MissConfig(
            task_type=peft_task_type(task),
            r=hp["block_size"],
            init_weights=self.init_weights,
            target_modules=targets if isinstance(targets, str) else list(targets),
            modules_to_save=list(task.head_modules),
        )

    def _fits(self, b: int, layer: nn.Linear) -> bool:
        return layer.in_features % b == 0 and (not self.divides_d_out or layer.out_features % b == 0)

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problems = super()._problems(model, hp, task)
        if problems:
            return problems
        b = hp["block_size"]
        bad = {name: m for name, m in targeted(model, self.peft_config(model, hp, task)) if not self._fits(b, m)}
        if not bad:
            return []
        what = "d_in and d_out" if self.divides_d_out else "d_in"
        shapes = sorted({f"{m.in_features} -> {m.out_features}" for m in bad.values()})
        return [f"block_size={b} must divide {what} of every target layer; it does not for "
                f"{len(bad)} layer(s) (e.g. {next(iter(bad))}) of shape (d_in -> d_out) {', '.join(shapes)}"]

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return sum(hp["block_size"] * m.out_features for _, m in targeted(model, self.peft_config(model, hp, task)))


@register
class Bone(_Miss):
    """BAT: W split into b x b blocks W_ab (a: output-row block, c: input-column block);
    W'_ac = W_ac + W_ac B_a + B_a with one b x b matrix B_a per output-row block (peft stores
    them as miss_block of shape (d_out/b, b, b)). The update depends on W, so peft materialises W'
    in every forward."""

    name = "bone"
    summary = "BAT (Bone's weight guide): a b x b matrix B_a per output-row block, dW_ac = W_ac B_a + B_a, and the head"
    paper = "Kang 2024, Bone: Block-Affine Adaptation of Large Language Models (now MiSS), arXiv 2409.15371"
    init_weights = "bat"
    divides_d_out = True


@register
class BoneSimple(_Miss):
    """peft's default MiSS (Bone without the weight guide): one b x d_out matrix B, the same update
    B^T added to every b-wide input block, W' = W + [B^T, B^T, ...]; x is summed over its input blocks
    and multiplied by B, so W is not materialised. peft itself would pad a d_in that b does not divide;
    we require b | d_in (METHODS.md), and nothing of d_out."""

    name = "bone_simple"
    summary = "Bone/MiSS shard: one b x d_out matrix shared by every input block, W' = W + [B^T, B^T, ...], and the head"
    paper = Bone.paper
    init_weights = True
    divides_d_out = False
