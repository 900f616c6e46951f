"""Bottleneck adapters inside BERT-style (post-LayerNorm) encoder layers: Houlsby (serial, after the
attention and FFN outputs) and AdaptFormer (parallel to the FFN, scaled). Neither can be merged."""
from __future__ import annotations

from abc import abstractmethod
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .base import HParam, Method, TaskInfo, in_head
from .registry import register

BOTTLENECK = HParam("bottleneck", int, 64, "bottleneck width m of each adapter", low=1, size=True)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}


class Bottleneck(nn.Module):
    """h -> W_up act(W_down h + b_down) + b_up, with W_up and both biases zero at init, so it outputs 0.
    Params 2 m d + m + d."""

    def __init__(self, d: int, m: int, activation: str, like: torch.Tensor, down_std: float | None) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.down, self.up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)
        self.activation = activation
        with torch.no_grad():
            if down_std is not None:  # Houlsby: small truncated normal; otherwise nn.Linear's kaiming-uniform
                nn.init.trunc_normal_(self.down.weight, std=down_std, a=-2 * down_std, b=2 * down_std)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(_ACTIVATIONS[self.activation](self.down(h)))

    @staticmethod
    def count(d: int, m: int) -> int:
        return 2 * m * d + m + d


class SerialAdapter(nn.Module):
    """A frozen sub-layer output projection followed by a Houlsby adapter: h + adapter(h), h = base(x).
    It sits where the projection was, so the layer's dropout, residual and LayerNorm follow it."""

    def __init__(self, dense: nn.Linear, adapter: Bottleneck) -> None:
        super().__init__()
        self.base, self.adapter = dense, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.adapter(h)


class ParallelFFNOutput(nn.Module):
    """A BERT FFN output block (dense, dropout, LayerNorm: same names, so the frozen tensors keep their
    names) with AdaptFormer's branch on the FFN input added to the dense output:
    LayerNorm(dropout(dense(intermediate) + s * adapter(ffn_input)) + ffn_input)."""

    def __init__(self, output: nn.Module, adapter: Bottleneck, scale: float) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = output.dense, output.dropout, output.LayerNorm
        self.adapter, self.scale = adapter, scale

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dense(hidden_states) + self.scale * self.adapter(input_tensor)
        return self.LayerNorm(self.dropout(h) + input_tensor)


def _post_ln_output(module: nn.Module | None) -> bool:
    """BertSelfOutput / BertOutput: exactly dense -> dropout -> LayerNorm(. + residual)."""
    return (
        module is not None
        and {n for n, _ in module.named_children()} == {"dense", "dropout", "LayerNorm"}
        and isinstance(module.dense, nn.Linear) and isinstance(module.LayerNorm, nn.LayerNorm)
    )


def bert_layers(model: nn.Module, task: TaskInfo) -> list[tuple[str, nn.Module]]:
    """BERT-style encoder layers (BertLayer, RobertaLayer, ...) outside the head: attention.output and
    output are post-LN output blocks, and an intermediate (FFN up projection) feeds output."""
    found = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        if (name and not in_head(name, task) and isinstance(getattr(module, "intermediate", None), nn.Module)
                and isinstance(attention, nn.Module) and _post_ln_output(getattr(attention, "output", None))
                and _post_ln_output(getattr(module, "output", None))):
            found.append((name, module))
    return found


class BertAdapters(Method):
    """Shared body: find the encoder layers, freeze everything but the head, insert per layer."""

    mergeable = False
    identity_at_init = True
    default_lr = 1e-3

    @abstractmethod
    def _insert(self, layer: nn.Module, hp: dict) -> None:
        """Add the adapters to one encoder layer (the model is already frozen) and unfreeze what trains."""

    @abstractmethod
    def _layer_count(self, layer: nn.Module, hp: dict) -> int:
        """Trainable parameters one encoder layer gets."""

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        if bert_layers(model, task):
            return []
        return [f"method {self.name} needs BERT-style post-LayerNorm encoder layers (a module with attention.output "
                f"and output made of dense, dropout and LayerNorm, plus intermediate, as in BertLayer); "
                f"none found in {type(model).__name__}"]

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, task))
        for _, layer in bert_layers(model, task):
            self._insert(layer, hp)
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return sum(self._layer_count(layer, hp) for _, layer in bert_layers(model, task))


@register
class Houlsby(BertAdapters):
    """Serial bottleneck adapters after the attention output projection and after the FFN output
    projection of each layer (before dropout, residual and LayerNorm, as in the paper's figure), plus
    that layer's two LayerNorms. W_up and the biases start at zero, so the model starts as the frozen
    one exactly; W_down starts as a truncated normal with std 1e-2. The embedding LayerNorm stays frozen."""

    name = "houlsby"
    summary = "serial bottleneck adapters after each attention and FFN output, the layers' LayerNorms, and the head"
    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP, arXiv 1902.00751"
    formula = "per encoder layer: 2 adapters x (2*m*d + m + d) (1 with placement=ffn) + its 2 LayerNorms (4*d) + head"
    hparams = (
        BOTTLENECK,
        HParam("activation", str, "gelu", "nonlinearity inside the bottleneck", choices=tuple(_ACTIVATIONS)),
        HParam(
            "placement", str, "attention+ffn",
            "attention+ffn: after both sub-layers (Houlsby); ffn: after the FFN output only (fewer parameters)",
            choices=("attention+ffn", "ffn"),
        ),
    )

    def _blocks(self, layer: nn.Module, hp: dict) -> list[nn.Module]:
        """The post-LN output blocks that get an adapter."""
        return [layer.output] if hp["placement"] == "ffn" else [layer.attention.output, layer.output]

    def _insert(self, layer: nn.Module, hp: dict) -> None:
        for block in self._blocks(layer, hp):
            dense = block.dense
            adapter = Bottleneck(dense.out_features, hp["bottleneck"], hp["activation"], dense.weight, down_std=1e-2)
            block.dense = SerialAdapter(dense, adapter)
        for block in (layer.attention.output, layer.output):
            block.LayerNorm.requires_grad_(True)

    def _layer_count(self, layer: nn.Module, hp: dict) -> int:
        adapters = sum(Bottleneck.count(b.dense.out_features, hp["bottleneck"]) for b in self._blocks(layer, hp))
        norms = sum(p.numel() for b in (layer.attention.output, layer.output) for p in b.LayerNorm.parameters())
        return adapters + norms


@register
class AdaptFormer(BertAdapters):
    """A scaled bottleneck parallel to each layer's FFN: FFN(h) + s * W_up relu(W_down h + b_down) + b_up,
    h the FFN's input (BERT is post-LN, so h is already normalised); the sum then goes through the
    layer's dropout, residual and LayerNorm. W_up and the biases start at zero (identity at init),
    W_down as nn.Linear's kaiming-uniform. Only the adapters and the head train."""

    name = "adaptformer"
    summary = "a scaled bottleneck branch parallel to each FFN, and the head"
    paper = ("Chen et al. 2022, AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, "
             "arXiv 2205.13535")
    formula = "per encoder layer: 2*d*m + m + d + head"
    hparams = (
        BOTTLENECK,
        HParam("scale", float, 0.1, "s, the fixed factor on the branch's output", low=0.0, open_low=True),
    )

    def _insert(self, layer: nn.Module, hp: dict) -> None:
        dense = layer.output.dense
        adapter = Bottleneck(dense.out_features, hp["bottleneck"], "relu", dense.weight, down_std=None)
        layer.output = ParallelFFNOutput(layer.output, adapter, hp["scale"])

    def _layer_count(self, layer: nn.Module, hp: dict) -> int:
        return Bottleneck.count(layer.output.dense.out_features, hp["bottleneck"])
