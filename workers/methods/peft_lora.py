"""LoRA and DoRA through peft's LoraConfig: one class, DoRA is LoRA with use_dora and a magnitude per row.
Update y = W x + s B A x with s = alpha/r (alpha/sqrt(r) with rsLoRA); B starts at zero."""
from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from peft import LoraConfig
from transformers.pytorch_utils import Conv1D
from torch import nn

from .base import HParam, TaskInfo, resolve_targets
from .peft_backed import PeftMethod, peft_task_type, targeted
from .registry import register

_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


@register
class Lora(PeftMethod):
    name = "lora"
    summary = "low-rank updates B A beside the target linear layers, and the head"
    paper = "Hu et al. 2021, LoRA, arXiv 2106.09685"
    formula = "r*(d_in+d_out) per target layer + head"
    mergeable = True
    identity_at_init = True
    default_lr = 5e-4
    use_dora: ClassVar[bool] = False
    quantizable = True  # peft wraps bitsandbytes' Linear4bit / Linear8bitLt with LoRA and DoRA
    layer_types = (nn.Linear, nn.Conv2d, Conv1D)
    hparams = (
        HParam("r", int, 8, "rank of the update B A", low=1, size=True),
        HParam(
            "alpha", float, 16, "update scaled by alpha/r (alpha/sqrt(r) with use_rslora)", low=0.0, open_low=True
        ),
        HParam("dropout", float, 0.05, "dropout on the adapter's input", low=0.0, high=1.0),
        HParam(
            "target_modules", list, None,
            "layers to adapt (linear, Conv1D or Conv2d): names or dotted suffixes (peft's matching), or "
            "'all-linear' (head excluded); default: the architecture's usual ones (query/value for BERT "
            "and ViT, c_attn for GPT-2, q_proj/v_proj for Llama, the 3x3 convs of the CIFAR ResNets)",
            choices=("all-linear",),
        ),
        HParam("use_rslora", bool, False, "rank-stabilised scaling alpha/sqrt(r)"),
        HParam(
            "init", str, "default",
            "default: A kaiming-uniform, B zero; gaussian: A normal, B zero; pissa: A, B from the top-r SVD of W, "
            "W replaced by the residual",
            choices=tuple(_INIT),
        ),
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> LoraConfig:
        targets = resolve_targets(model, hp["target_modules"]) or []
        return LoraConfig(
            task_type=peft_task_type(task),
            r=hp["r"],
            lora_alpha=hp["alpha"],
            lora_dropout=hp["dropout"],
            target_modules=targets if isinstance(targets, str) else list(targets),
            use_rslora=hp["use_rslora"],
            init_lora_weights=_INIT[hp["init"]],
            use_dora=self.use_dora,
            modules_to_save=list(task.head_modules) or None,
            # GPT-2's Conv1D stores its weight transposed; peft must be told, or it warns and guesses.
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        )

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        r = hp["r"]
        total = 0
        for _, m in targeted(model, self.peft_config(model, hp, task)):
            if isinstance(m, nn.Conv2d):
                # A is a conv of the layer's kernel to r channels, B a 1x1 conv back to d_out.
                fan_in, d_out = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups, m.out_channels
            elif isinstance(m, Conv1D):  # GPT-2's transposed linear: weight is (d_in, d_out)
                fan_in, d_out = m.weight.shape
            else:
                fan_in, d_out = m.in_features, m.out_features
            total += r * (fan_in + d_out) + (d_out if self.use_dora else 0)
        return total


@register
class Dora(Lora):
    name = "dora"
    summary = "LoRA on the direction of W plus a trained magnitude per output row, and the head"
    paper = "Liu et al. 2024, DoRA, arXiv 2402.09353"
    formula = "r*(d_in+d_out) + d_out per target layer + head"
    use_dora = True
    # With dropout on the adapter's input, peft's DoRA runs the frozen layer a second time on
    # the dropped input (a full extra matmul per target per step); without it, it reuses the
    # base output. So DoRA defaults to no dropout; set `dropout` to pay for it deliberately.
    hparams = tuple(
        replace(h, default=0.0, doc=h.doc + " (costs DoRA a second pass of the frozen layer)")
        if h.name == "dropout" else h
        for h in Lora.hparams
    )
