"""Bottleneck adapters inside the transformer blocks of every architecture in the architecture table
(BERT's post-LN, ViT, GPT-2 and Llama-style pre-LN): Houlsby (serial) and AdaptFormer (parallel)."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from peftlab.workers.architectures import Architecture, architecture, blocks, describe, supported

from .base import HParam, Method, TaskInfo, in_head
from .registry import register

BOTTLENECK = HParam("bottleneck", int, 64, "bottleneck width m of each adapter", low=1, size=True)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # adapter-bert's GELU is the tanh approximation
    "relu": F.relu,
    "swish": F.silu,
}
ADAPTER = "adapter"
"""The child name an adapter gets on the module whose output it changes."""


class Bottleneck(nn.Module):
    """h -> W_up dropout(act(W_down h + b_down)) + b_up. Params 2 m d + m + d. Both biases start at zero;
    `init_std` set: both weights truncated normal (Houlsby's near-identity init), else W_down as
    nn.Linear's kaiming-uniform and W_up zero (AdaptFormer's: exactly 0 at init)."""

    def __init__(self, d: int, m: int, activation: str, like: torch.Tensor, init_std: float | None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.down, self.up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)
        self.activation, self.dropout = activation, dropout
        self.captured: torch.Tensor | None = None
        """AdaptFormer: the branch's input, kept by a hook on the block until the FFN output arrives."""
        with torch.no_grad():
            if init_std is not None:
                for weight in (self.down.weight, self.up.weight):
                    nn.init.trunc_normal_(weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            else:
                self.up.weight.zero_()
            self.down.bias.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hidden = _ACTIVATIONS[self.activation](self.down(h))
        return self.up(F.dropout(hidden, self.dropout, self.training))

    @staticmethod
    def count(d: int, m: int) -> int:
        return 2 * m * d + m + d


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _serial(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the module's output h becomes h + adapter(h)."""
    h = _first(output)
    return _replace_first(output, h + getattr(module, ADAPTER)(h))


def _capture(adapter: Bottleneck) -> Callable:
    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        adapter.captured = args[0] if args else kwargs["hidden_states"]
    return keep


def _parallel(scale: float) -> Callable:
    def add(module: nn.Module, args: tuple, output: Any) -> Any:
        adapter = getattr(module, ADAPTER)
        x, adapter.captured = adapter.captured, None
        return _replace_first(output, _first(output) + scale * adapter(x))
    return add


def _width(block: nn.Module, arch: Architecture) -> int:
    norm = block.get_submodule(arch.block.norms[-1])
    return int(norm.weight.shape[0])


def norm_modules(model: nn.Module, task: TaskInfo) -> list[tuple[str, nn.Module]]:
    """Every LayerNorm / RMSNorm outside the head (the embeddings', the blocks', the final one)."""
    return [(n, m) for n, m in model.named_modules()
            if n and not in_head(n, task) and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"))]


class BlockAdapters(Method):
    """Shared body: find the blocks through the architecture table, freeze everything but the head,
    insert per block (adapters hang on existing modules through forward hooks, so no frozen tensor is
    renamed)."""

    mergeable = False
    default_lr = 1e-3

    @abstractmethod
    def _insert(self, block: nn.Module, arch: Architecture, hp: dict) -> None:
        """Add the adapters to one block (the model is already frozen)."""

    @abstractmethod
    def _block_count(self, block: nn.Module, arch: Architecture, hp: dict) -> int:
        """Trainable parameters one block gets."""

    def _extra(self, model: nn.Module, task: TaskInfo) -> list[nn.Module]:
        """Modules outside the blocks' adapters that also train (none by default)."""
        return []

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        if architecture(model) is None:
            return [(f"method {self.name} inserts adapters into transformer blocks, and the architecture table has "
                     f"no entry for {describe(model)} (it knows: {supported()}); methods that take target_modules "
                     f"(lora, dora, ...) work on any model")]
        if not blocks(model, task.head_modules):
            return [f"method {self.name} found no transformer blocks in {describe(model)}"]
        return []

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, task))
        arch = architecture(model)
        for module in self._extra(model, task):
            module.requires_grad_(True)
        for _, block in blocks(model, task.head_modules):
            self._insert(block, arch, hp)
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        arch = architecture(model)
        extra = sum(p.numel() for m in self._extra(model, task) for p in m.parameters())
        return extra + sum(self._block_count(b, arch, hp) for _, b in blocks(model, task.head_modules))


@register
class Houlsby(BlockAdapters):
    """Serial bottleneck adapters on the attention sub-layer's output and on the FFN's output of each
    block, before the residual is added: h + adapter(h). On BERT that is google-research/adapter-bert's
    place (dense -> dropout -> adapter -> LayerNorm(. + residual)); on pre-LN blocks the same point
    before the residual add (ViT shares one dropout between its sub-layers, so there the adapter comes
    before it). Both projections start as truncated normals with std 1e-3 and the biases at zero, as in
    adapter-bert: near the identity, not exactly it. Every LayerNorm / RMSNorm outside the head trains
    too (adapter-bert trains all of BERT's, the embeddings' included)."""

    name = "houlsby"
    summary = "serial bottleneck adapters after each attention and FFN output, the LayerNorms, and the head"
    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP, arXiv 1902.00751"
    formula = "per block: 2 adapters x (2*m*d + m + d) (1 with placement=ffn) + every LayerNorm (2*d each) + head"
    identity_at_init = False
    near_identity_at_init = True
    hparams = (
        BOTTLENECK,
        HParam("activation", str, "gelu", "nonlinearity inside the bottleneck (gelu: the tanh approximation)",
               choices=tuple(_ACTIVATIONS)),
        HParam(
            "placement", str, "attention+ffn",
            "attention+ffn: after both sub-layers (Houlsby); ffn: after the FFN output only (fewer parameters)",
            choices=("attention+ffn", "ffn"),
        ),
        HParam("init_std", float, 1e-3, "std of both projections' truncated-normal init (adapter-bert: 1e-3)",
               low=0.0, open_low=True),
    )

    def _places(self, arch: Architecture, hp: dict) -> list[str]:
        ffn = [arch.block.ffn_out]
        return ffn if hp["placement"] == "ffn" else [arch.block.attention_out, *ffn]

    def _extra(self, model: nn.Module, task: TaskInfo) -> list[nn.Module]:
        return [m for _, m in norm_modules(model, task)]

    def _insert(self, block: nn.Module, arch: Architecture, hp: dict) -> None:
        d, like = _width(block, arch), next(block.parameters())
        for path in self._places(arch, hp):
            module = block.get_submodule(path)
            module.add_module(ADAPTER, Bottleneck(d, hp["bottleneck"], hp["activation"], like, hp["init_std"]))
            module.register_forward_hook(_serial)

    def _block_count(self, block: nn.Module, arch: Architecture, hp: dict) -> int:
        return len(self._places(arch, hp)) * Bottleneck.count(_width(block, arch), hp["bottleneck"])


@register
class AdaptFormer(BlockAdapters):
    """A scaled bottleneck parallel to each block's FFN, as in ShoufaChen/AdaptFormer: the branch reads the
    stream the FFN sub-layer starts from (pre-LN: before the norm; BERT's post-LN: the normalised attention
    output), applies ReLU and dropout (0.1, the reference's) between its projections, and is added with
    factor s to the FFN's output after the FFN's own dropout, before the residual. W_up and the biases
    start at zero (identity at init), W_down as nn.Linear's kaiming-uniform. Only the adapters and the
    head train."""

    name = "adaptformer"
    summary = "a scaled bottleneck branch parallel to each FFN, and the head"
    paper = ("Chen et al. 2022, AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, "
             "arXiv 2205.13535")
    formula = "per block: 2*d*m + m + d + head"
    identity_at_init = True
    hparams = (
        BOTTLENECK,
        HParam("scale", float, 0.1, "s, the fixed factor on the branch's output", low=0.0, open_low=True),
        HParam("dropout", float, 0.1, "dropout inside the branch, after the ReLU", low=0.0, high=0.99),
    )

    def _insert(self, block: nn.Module, arch: Architecture, hp: dict) -> None:
        adapter = Bottleneck(_width(block, arch), hp["bottleneck"], "relu", next(block.parameters()), None,
                             dropout=hp["dropout"])
        ffn_out = block.get_submodule(arch.block.ffn_out)
        ffn_out.add_module(ADAPTER, adapter)
        block.get_submodule(arch.block.ffn_in).register_forward_pre_hook(_capture(adapter), with_kwargs=True)
        ffn_out.register_forward_hook(_parallel(hp["scale"]))

    def _block_count(self, block: nn.Module, arch: Architecture, hp: dict) -> int:
        return Bottleneck.count(_width(block, arch), hp["bottleneck"])
