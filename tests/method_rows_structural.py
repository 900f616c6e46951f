"""Contract-table rows for the structural methods: ETHER, ETHER+, Bone/BAT (peft's MiSS), Houlsby and
AdaptFormer, with parameter formulas written from the tiny models' shapes (bert: hidden 32, FFN 37;
roberta: hidden 24, FFN 50), so block sizes are chosen to divide the targeted layers."""
from __future__ import annotations

from typing import Callable

from peft import MissConfig
from torch import nn

from method_table import Case, head, in_any_head, linears, peft_owned
from tiny_models import ALL_CONFIGS


def per_target(names: tuple[str, ...] | None, formula: Callable[[int, int], int]) -> Callable[[nn.Module], int]:
    """head + formula(d_in, d_out) summed over the target linear layers (None: every linear layer)."""
    keep = (lambda n: True) if names is None else (lambda n: n.rsplit(".", 1)[-1] in names)
    return lambda m: head(m) + sum(formula(l.in_features, l.out_features) for l in linears(m, keep))


def per_layer(formula: Callable[[int], int]) -> Callable[[nn.Module], int]:
    """head + formula(hidden size) for each encoder layer."""
    return lambda m: head(m) + m.config.num_hidden_layers * formula(m.config.hidden_size)


def owned(*markers: str) -> Callable[[str], bool]:
    return lambda n: in_any_head(n) or any(k in n for k in markers)


def norm_params(m: nn.Module) -> int:
    """Every LayerNorm / RMSNorm's parameters outside the head (embeddings', blocks', final)."""
    return sum(p.numel() for n, mod in m.named_modules() if not in_any_head(n)
               and (isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")) for p in mod.parameters())


QV = ("query", "value")
QKV = ("query", "key", "value")


def houlsby_owns(n: str) -> bool:
    """The adapters, every LayerNorm / RMSNorm, the head."""
    return owned(".adapter.", "LayerNorm.", "layernorm", "layer_norm", ".ln_", "norm.")(n)


EVERY_ARCHITECTURE = tuple(ALL_CONFIGS)


ROWS = [
    # ETHER: d_in per target, whatever n_blocks.
    Case("ether", {"n_blocks": 4}, per_target(QV, lambda i, o: i), owned("ether_")),
    Case("ether", {"n_blocks": 1, "target_modules": "all-linear"}, per_target(None, lambda i, o: i), owned("ether_"),
         id="ether-all-linear"),
    # (query and key alone would barely move the tiny models' logits: their attention is nearly uniform)
    Case("ether", {"n_blocks": 8, "target_modules": ["key", "attention.output.dense"]},
         lambda m: per_target(("key",), lambda i, o: i)(m) + sum(
             l.in_features for l in linears(m, lambda n: n.endswith("attention.output.dense"))),
         owned("ether_"), id="ether-8-blocks"),
    # ETHER+: 2 d_in one-sided, 2 (d_in + d_out) two-sided.
    Case("ether_plus", {"n_blocks": 4}, per_target(QV, lambda i, o: 2 * i), owned("ether_")),
    Case("ether_plus", {"n_blocks": 2, "sides": 2, "target_modules": list(QKV)}, per_target(QKV, lambda i, o: 2 * (i + o)),
         owned("ether_"), id="ether_plus-two-sided"),
    Case("ether_plus", {"n_blocks": 1, "sides": 2, "target_modules": "all-linear"},
         per_target(None, lambda i, o: 2 * (i + o)), owned("ether_"), id="ether_plus-two-sided-all-linear"),
    # Bone / BAT: b d_out per target; 8 and 4 divide 32 and 24.
    Case(
        "bone", {"block_size": 8}, per_target(QV, lambda i, o: 8 * o), peft_owned("miss_"),
        lambda: MissConfig(task_type="SEQ_CLS", r=8, init_weights="bat", target_modules=["query", "value"]),
    ),
    Case(
        "bone", {"block_size": 4, "target_modules": list(QKV)}, per_target(QKV, lambda i, o: 4 * o),
        peft_owned("miss_"),
        lambda: MissConfig(task_type="SEQ_CLS", r=4, init_weights="bat", target_modules=list(QKV)),
        id="bone-qkv",
    ),
    Case(
        "bone_simple", {"block_size": 8}, per_target(QV, lambda i, o: 8 * o), peft_owned("miss_"),
        lambda: MissConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]),
    ),
    Case(  # b | d_in is all bone_simple needs: intermediate.dense is 32 -> 37 and 24 -> 50
        "bone_simple", {"block_size": 4, "target_modules": ["query", "intermediate.dense"]},
        lambda m: per_target(("query",), lambda i, o: 4 * o)(m) + 4 * m.config.num_hidden_layers
        * m.config.intermediate_size,
        peft_owned("miss_"),
        lambda: MissConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "intermediate.dense"]),
        id="bone_simple-ffn",
    ),
    # Houlsby: two adapters (2 m d + m + d) and two LayerNorms (2 d each) per layer.
    Case("houlsby", {"bottleneck": 4}, lambda m: per_layer(lambda d: 2 * (2 * 4 * d + 4 + d))(m) + norm_params(m),
         houlsby_owns, shapes=EVERY_ARCHITECTURE),
    Case("houlsby", {"bottleneck": 3, "placement": "ffn", "activation": "swish"},
         lambda m: per_layer(lambda d: 2 * 3 * d + 3 + d)(m) + norm_params(m), houlsby_owns, id="houlsby-ffn"),
    # AdaptFormer: one parallel adapter per layer.
    Case("adaptformer", {"bottleneck": 4}, per_layer(lambda d: 2 * d * 4 + 4 + d), owned(".adapter."),
         shapes=EVERY_ARCHITECTURE),
    Case("adaptformer", {"bottleneck": 5, "scale": 1.0, "dropout": 0.0}, per_layer(lambda d: 2 * d * 5 + 5 + d),
         owned(".adapter."), id="adaptformer-scale-1"),
]
