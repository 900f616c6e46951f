"""Contract-table rows that run the seed papers' methods with their defaults on the ViT, GPT-2 and
Llama-style shapes too (besides BERT and RoBERTa): targets come from the architecture table (q_proj and
v_proj, GPT-2's fused c_attn), with the formulas written from those layers' shapes."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from method_rows_lowrank import PerLayer, bora, spectral_add, spectral_rot
from method_table import Case, head, in_any_head, linears, peft_owned
from peftlab.workers.architectures import architecture, default_targets
from tiny_models import ALL_CONFIGS

EVERY_ARCHITECTURE = tuple(ALL_CONFIGS)


def on_defaults(formula: PerLayer) -> Callable[[nn.Module], int]:
    """Head plus formula(d_in, d_out) over the architecture's default target layers."""
    def count(m: nn.Module) -> int:
        names = default_targets(m)
        return head(m) + sum(formula(l.in_features, l.out_features)
                             for l in linears(m, lambda n: n.rsplit(".", 1)[-1] in names))
    return count


def ia3_on_defaults(m: nn.Module) -> int:
    """d_out for the architecture's key and value targets, d_in for its FFN output projection."""
    found = architecture(m)

    def matches(names: tuple[str, ...]) -> Callable[[str], bool]:
        return lambda n: any(n == t or n.endswith("." + t) for t in names)

    scaled = tuple(t for t in found.rescaled if t not in found.feedforward)
    return (head(m) + sum(l.out_features for l in linears(m, matches(scaled)))
            + sum(l.in_features for l in linears(m, matches(found.feedforward))))


def owned(marker: str) -> Callable[[str], bool]:
    return lambda n: in_any_head(n) or marker in n


def row(method: str, hparams: dict, formula: PerLayer, owns: Callable[[str], bool]) -> Case:
    return Case(method, hparams, on_defaults(formula), owns, id=f"{method}-defaults", shapes=EVERY_ARCHITECTURE)


ROWS = [
    row("lora", {"r": 4}, lambda i, o: 4 * (i + o), peft_owned("lora_")),
    row("dora", {"r": 4}, lambda i, o: 4 * (i + o) + o, peft_owned("lora_")),
    row("bora", {"r": 4, "dropout": 0.0}, bora(4), owned(".bora_")),
    row("spectral_add", {"r": 4}, spectral_add(4), owned(".spectral_")),
    row("spectral_rot", {"r": 4}, spectral_rot(4, True), owned(".spectral_")),
    row("ether", {"n_blocks": 4}, lambda i, o: i, owned(".ether_")),
    row("ether_plus", {"n_blocks": 4}, lambda i, o: 2 * i, owned(".ether_")),
    row("vera", {"r": 8}, lambda i, o: 8 + o, peft_owned("vera_lambda_")),
    row("adalora", {"init_r": 4, "target_r": 2, "total_step": 10}, lambda i, o: 4 * (i + o + 1), peft_owned("lora_")),
    Case("ia3", {}, ia3_on_defaults, peft_owned("ia3_"), id="ia3-defaults", shapes=EVERY_ARCHITECTURE),
]
# peft's MiSS (bone) adapts nn.Linear only, so not GPT-2's Conv1D layers (refused in one line: test_methods).
ROWS.append(Case("bone", {"block_size": 8}, on_defaults(lambda i, o: 8 * o), peft_owned("miss_"), id="bone-defaults",
                 shapes=("vit", "llama")))
