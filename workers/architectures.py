"""Where each supported architecture keeps what methods adapt: its attention's query and value
projections (the usual default targets) and, per transformer block, the sub-layer outputs and norms, and
the attention heads and FFN neurons a pruning method removes."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """Paths inside one transformer block (relative to the block module)."""

    attention_out: str
    """The module whose output is the attention sub-layer's output, before the residual is added."""
    ffn_in: str
    """The module whose input is the stream the FFN sub-layer starts from: the residual stream before
    the pre-FFN norm (pre-LN), or the normalised attention output (post-LN)."""
    ffn_out: str
    """The module whose output is the FFN sub-layer's output, before the residual is added."""
    norms: tuple[str, ...]
    pre_norm: bool
    """True where each sub-layer normalises its input (ViT, GPT-2, Llama), False for BERT's post-LN."""


@dataclass(frozen=True)
class UnitLayout:
    """Where a block keeps its attention heads and FFN neurons (paths relative to the block), for methods
    that remove them: the projections whose outputs are the heads, the one whose inputs they are, the
    same pair for the FFN's neurons, and the attributes that count them (updated when some go)."""

    query: str
    """The query projection; or, where `key` and `value` are None, one projection whose outputs are
    [queries | keys | values] (GPT-2's fused c_attn, cut at the attention's `split_size`)."""
    key: str | None
    value: str | None
    attention_out: str
    """The projection whose inputs are the heads' outputs side by side (head 0 first)."""
    ffn_up: tuple[str, ...]
    """The projections whose outputs are the FFN's neurons (up, and gate where the FFN is gated)."""
    ffn_down: str
    """The projection whose inputs are the FFN's neurons."""
    head_counts: tuple[str, ...] = ()
    """Attributes (dotted, from the block) equal to the number of query heads. Key/value head counts
    need none: the supported attentions infer them from the projections' widths and keep only
    `num_key_value_groups`, which stays when whole key/value groups go."""
    head_widths: tuple[str, ...] = ()
    """Attributes equal to query heads x head size."""
    ffn_widths: tuple[str, ...] = ()
    """Attributes equal to the number of FFN neurons."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    """Hugging Face `config.model_type` values with this layout."""
    query_value: tuple[str, ...]
    """The attention projections LoRA-style methods adapt by default (peft's choice per architecture)."""
    block: BlockLayout
    rescaled: tuple[str, ...]
    """(IA)^3's default targets: the key and value projections and the FFN's output projection."""
    feedforward: tuple[str, ...]
    """Those of `rescaled` that belong to the FFN ((IA)^3 scales their input, not their output)."""
    units: UnitLayout | None = None
    """Attention heads and FFN neurons, for methods that remove them (Light-PEFT); None: not known."""


ARCHITECTURES = (
    Architecture("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"), ("query", "value"),
                 BlockLayout("attention.output.dropout", "intermediate", "output.dropout",
                             ("attention.output.LayerNorm", "output.LayerNorm"), pre_norm=False),
                 # peft's choice: "output.dense" also matches attention.output.dense
                 ("key", "value", "output.dense"), ("output.dense",),
                 UnitLayout("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", ("intermediate.dense",), "output.dense",
                            head_counts=("attention.self.num_attention_heads",),
                            head_widths=("attention.self.all_head_size",))),
    Architecture("distilbert", ("distilbert",), ("q_lin", "v_lin"),
                 BlockLayout("attention", "ffn", "ffn", ("sa_layer_norm", "output_layer_norm"), pre_norm=False),
                 ("k_lin", "v_lin", "lin2"), ("lin2",),
                 UnitLayout("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                            ("ffn.lin1",), "ffn.lin2", head_counts=("attention.n_heads",))),
    Architecture("vit", ("vit",), ("q_proj", "v_proj"),
                 BlockLayout("attention", "layernorm_after", "mlp", ("layernorm_before", "layernorm_after"),
                             pre_norm=True),
                 ("k_proj", "v_proj", "fc2"), ("fc2",),
                 UnitLayout("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            ("mlp.fc1",), "mlp.fc2", head_counts=("attention.num_attention_heads",))),
    Architecture("gpt2", ("gpt2",), ("c_attn",),
                 BlockLayout("attn.resid_dropout", "ln_2", "mlp", ("ln_1", "ln_2"), pre_norm=True),
                 ("c_attn", "mlp.c_proj"), ("mlp.c_proj",),
                 UnitLayout("attn.c_attn", None, None, "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj",
                            head_counts=("attn.num_heads",), head_widths=("attn.split_size",))),
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3"), ("q_proj", "v_proj"),
                 BlockLayout("self_attn", "post_attention_layernorm", "mlp",
                             ("input_layernorm", "post_attention_layernorm"), pre_norm=True),
                 ("k_proj", "v_proj", "down_proj"), ("down_proj",),
                 UnitLayout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", ffn_widths=("mlp.intermediate_size",))),
)
BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
_BLOCK_NAME = re.compile(r"(^|\.)(layer|layers|h)\.\d+$")


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture(model: nn.Module) -> Architecture | None:
    """The table's entry for the model (a peft-wrapped one too); None for an architecture it lacks."""
    return BY_MODEL_TYPE.get(model_type(model))


def describe(model: nn.Module) -> str:
    kind = model_type(model)
    return f"{type(model).__name__}" + (f" (model type '{kind}')" if kind else "")


def supported() -> str:
    return ", ".join(t for a in ARCHITECTURES for t in a.model_types)


def default_targets(model: nn.Module) -> list[str] | None:
    """The layers LoRA-style methods adapt when the spec names none: the model's own
    `default_target_modules` (peftlab's CIFAR ResNets: their 3x3 convs), else the table's query and
    value projections; None for an architecture the table lacks."""
    own = getattr(model, "default_target_modules", None)
    if own:
        return list(own)
    found = architecture(model)
    return list(found.query_value) if found else None


def no_default(model: nn.Module, method: str) -> str:
    return (f"method {method} has no default target_modules for {describe(model)}: the architecture table knows "
            f"{supported()}; set target_modules")


def blocks(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks in order (names ending in layer.N / layers.N / h.N, with every
    path of the layout), outside the modules named in `skip` (the head)."""
    found = architecture(model)
    if found is None:
        return []
    paths = (found.block.attention_out, found.block.ffn_in, found.block.ffn_out, *found.block.norms)
    out = []
    for name, module in model.named_modules():
        if not _BLOCK_NAME.search(name) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if all(_has(module, path) for path in paths):
            out.append((name, module))
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
