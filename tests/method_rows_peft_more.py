"""Contract-table rows for the other peft-backed methods: OFT, BOFT, HRA, VeRA, LoHa, LoKr and AdaLoRA,
each with the plain peft config it must equal and a parameter formula written by hand per layer shape."""
from __future__ import annotations

import math
from typing import Callable

from peft import AdaLoraConfig, BOFTConfig, HRAConfig, LoHaConfig, LoKrConfig, OFTConfig, VeraConfig
from torch import nn

from method_table import Case, head, linears, peft_owned

PerLayer = Callable[[int, int], int]  # (d_in, d_out) -> trainable parameters added to that layer
QV = ("query", "value")
ROBERTA = ("roberta",)  # tiny BERT's d_in are 32 and 37 (prime): no block size fits all its linear layers


def summed(formula: PerLayer, names: tuple[str, ...] | None = QV) -> Callable[[nn.Module], int]:
    """Head plus formula over the target linear layers; names None means all linear layers."""
    keep = (lambda n: True) if names is None else (lambda n: n.rsplit(".", 1)[-1] in names)
    return lambda m: head(m) + sum(formula(l.in_features, l.out_features) for l in linears(m, keep))


def oft(b: int, share: bool = False) -> PerLayer:
    """d_in / b skew-symmetric b x b blocks (b(b-1)/2 free entries each), or one block shared."""
    return lambda d_in, d_out: (1 if share else d_in // b) * b * (b - 1) // 2


def boft(b: int) -> PerLayer:
    """d_in / b full b x b blocks (peft stores the whole matrix) and a scale per output row."""
    return lambda d_in, d_out: (d_in // b) * b * b + d_out


def near_sqrt(n: int, factor: int | None) -> tuple[int, int]:
    """n = m * k: m = factor where it divides n, else the largest divisor of n up to sqrt(n)."""
    m = factor if factor and n % factor == 0 else max(f for f in range(1, math.isqrt(n) + 1) if n % f == 0)
    return m, n // m


def lokr(r: int, both: bool = False, factor: int | None = None) -> PerLayer:
    """W1 (a x c) kron W2 (b x d) with d_out = a*b, d_in = c*d; a factor is stored as a rank-r product
    only when r is below half its larger side (W1 only with decompose_both)."""
    def count(d_in: int, d_out: int) -> int:
        (a, b), (c, d) = near_sqrt(d_out, factor), near_sqrt(d_in, factor)
        w1 = r * (a + c) if both and r < max(a, c) / 2 else a * c
        w2 = r * (b + d) if r < max(b, d) / 2 else b * d
        return w1 + w2
    return count


ROWS = [
    Case(
        "oft", {"block_size": 4}, summed(oft(4)), peft_owned("oft_R"),
        lambda: OFTConfig(task_type="SEQ_CLS", r=0, oft_block_size=4, target_modules=["query", "value"]),
    ),
    Case(
        "oft", {"block_size": 8, "block_share": True, "use_cayley_neumann": False},
        summed(oft(8, share=True)), peft_owned("oft_R"),
        lambda: OFTConfig(task_type="SEQ_CLS", r=0, oft_block_size=8, target_modules=["query", "value"],
                          block_share=True, use_cayley_neumann=False),
        id="oft-shared-exact-cayley",
    ),
    Case(
        "oft", {"block_size": 2, "target_modules": "all-linear", "coft": True}, summed(oft(2), None),
        peft_owned("oft_R"),
        lambda: OFTConfig(task_type="SEQ_CLS", r=0, oft_block_size=2, target_modules="all-linear", coft=True),
        id="oft-coft-all-linear", shapes=ROBERTA,
    ),
    Case(
        "boft", {"block_size": 4}, summed(boft(4)), peft_owned("boft_"),
        lambda: BOFTConfig(task_type="SEQ_CLS", boft_block_size=4, target_modules=["query", "value"]),
    ),
    Case(
        "boft", {"block_size": 2, "target_modules": "all-linear", "dropout": 0.1}, summed(boft(2), None),
        peft_owned("boft_"),
        lambda: BOFTConfig(task_type="SEQ_CLS", boft_block_size=2, target_modules="all-linear", boft_dropout=0.1),
        id="boft-all-linear", shapes=ROBERTA,
    ),
    Case(
        "hra", {"r": 4}, summed(lambda d_in, d_out: 4 * d_in), peft_owned("hra_u"),
        lambda: HRAConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    ),
    Case(
        "hra", {"r": 2, "target_modules": "all-linear"}, summed(lambda d_in, d_out: 2 * d_in, None),
        peft_owned("hra_u"),
        lambda: HRAConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"),
        id="hra-all-linear",
    ),
    Case(
        "vera", {"r": 16}, summed(lambda d_in, d_out: 16 + d_out), peft_owned("vera_lambda_"),
        lambda: VeraConfig(task_type="SEQ_CLS", r=16, target_modules=["query", "value"]),
    ),
    Case(
        "vera", {"r": 8, "target_modules": "all-linear", "d_initial": 0.05, "projection_seed": 3},
        summed(lambda d_in, d_out: 8 + d_out, None), peft_owned("vera_lambda_"),
        lambda: VeraConfig(task_type="SEQ_CLS", r=8, target_modules="all-linear", d_initial=0.05,
                           projection_prng_key=3),
        id="vera-all-linear",
    ),
    Case(
        "loha", {"r": 4, "alpha": 8}, summed(lambda d_in, d_out: 2 * 4 * (d_in + d_out)), peft_owned("hada_"),
        lambda: LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value"]),
    ),
    Case(
        "loha", {"r": 2, "alpha": 4, "target_modules": "all-linear", "rank_dropout": 0.1},
        summed(lambda d_in, d_out: 2 * 2 * (d_in + d_out), None), peft_owned("hada_"),
        lambda: LoHaConfig(task_type="SEQ_CLS", r=2, alpha=4, target_modules="all-linear", rank_dropout=0.1),
        id="loha-all-linear",
    ),
    Case(
        "lokr", {"r": 2}, summed(lokr(2)), peft_owned("lokr_"),
        lambda: LoKrConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]),
    ),
    Case(
        "lokr", {"r": 2, "decompose_both": True, "target_modules": "all-linear", "rank_dropout": 0.1},
        summed(lokr(2, both=True), None), peft_owned("lokr_"),
        lambda: LoKrConfig(task_type="SEQ_CLS", r=2, decompose_both=True, target_modules="all-linear",
                           rank_dropout=0.1),
        id="lokr-decompose-both-all-linear",
    ),
    Case(
        "lokr", {"r": 8, "decompose_factor": 4}, summed(lokr(8, factor=4)), peft_owned("lokr_"),
        lambda: LoKrConfig(task_type="SEQ_CLS", r=8, decompose_factor=4, target_modules=["query", "value"]),
        id="lokr-factor-full",
    ),
    Case(
        "adalora", {"init_r": 4, "target_r": 2, "total_step": 10},
        summed(lambda d_in, d_out: 4 * (d_in + d_out + 1)), peft_owned("lora_"),
        lambda: AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, total_step=10, lora_dropout=0.05,
                              target_modules=["query", "value"]),
    ),
    Case(
        "adalora", {"init_r": 3, "target_modules": "all-linear"},
        summed(lambda d_in, d_out: 3 * (d_in + d_out + 1), None), peft_owned("lora_"),
        lambda: AdaLoraConfig(task_type="SEQ_CLS", init_r=3, target_r=2, total_step=1, lora_dropout=0.05,
                              target_modules="all-linear"),
        id="adalora-all-linear",
    ),
]
