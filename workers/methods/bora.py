"""BoRA (Wang et al. 2024): DoRA with a trained magnitude on both sides of W, one per output row and one
per input column, around a LoRA update of the direction; mergeable, the identity at init.

The exact equations could not be read from the paper (arXiv 2412.06441) when this was written: this
is METHODS.md's reading of it, and the one place that fixes the reading is `normalise` below.

    V  = W + s B A                       s = alpha / r, A (r x d_in) kaiming-uniform, B (d_out x r) zero
    V1 = diag(m_r / ||V||_row) V          rows of V1 have norms m_r (length d_out)
    W' = V1 diag(m_c / ||V1||_col)        columns of W' have norms m_c (length d_in)

Both norms are constants in backprop (detached, as DoRA does). Any such order of row and column
normalisations gives W' = diag(g) V diag(c) for two vectors g, c, which is what the forward uses:
y = g * (W (c x) + s B A dropout(c x)) + b.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import HParam
from .registry import register
from .spectral import RankedWrapping
from .wrapped import TARGET_MODULES, AdaptedLinear, lora_factors

_EPS = 1e-12  # a zero row or column of V gives scale 0 rather than nan (its entries are 0 anyway)


def normalise(V: torch.Tensor, m_row: torch.Tensor, m_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g (d_out), c (d_in) such that W' = diag(g) V diag(c): rows first, then columns; norms detached.
    To read the paper differently (columns first, or one joint norm), change only this function."""
    with torch.no_grad():
        row_norm = V.norm(dim=1).clamp_min(_EPS)
    g = m_row / row_norm
    with torch.no_grad():
        col_norm = (V * g[:, None]).norm(dim=0).clamp_min(_EPS)
    return g, m_col / col_norm


def initial_magnitudes(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m_r, m_c with normalise(W, m_r, m_c) == (1, 1): W's row norms and column norms. Whichever side
    `normalise` scales first is then already unit-scaled, so the second sees W itself."""
    return W.norm(dim=1), W.norm(dim=0)


class BoraLinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        W, r = base.weight, hp["r"]
        self.scaling = hp["alpha"] / r
        self.bora_A, self.bora_B = lora_factors(W, r)
        m_row, m_col = initial_magnitudes(W.detach())
        self.bora_m_row = nn.Parameter(m_row)
        self.bora_m_col = nn.Parameter(m_col)
        self.dropout = nn.Dropout(hp["dropout"]) if hp["dropout"] > 0 else nn.Identity()

    def direction(self) -> torch.Tensor:
        """V = W + s B A (d_out x d_in)."""
        return torch.addmm(self.base.weight, self.bora_B, self.bora_A, alpha=self.scaling)

    def adapted_weight(self) -> torch.Tensor:
        V = self.direction()
        g, c = normalise(V, self.bora_m_row, self.bora_m_col)
        return g[:, None] * V * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # V is needed only for the two detached norms, so it is built without autograd (d_out d_in r
        # MACs and one d_out x d_in temporary per step, no saved activations); the gradient path is
        # LoRA's plus two elementwise scalings, of the input (c) and of the output (g).
        with torch.no_grad():
            V = self.direction()
        g, c = normalise(V, self.bora_m_row, self.bora_m_col)
        xc = x * c
        low_rank = (self.dropout(xc) @ self.bora_A.T) @ self.bora_B.T
        out = g * (F.linear(xc, self.base.weight) + self.scaling * low_rank)
        return out if self.base.bias is None else out + self.base.bias

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return hp["r"] * (d_in + d_out) + d_in + d_out


@register
class Bora(RankedWrapping):
    name = "bora"
    summary = "LoRA on the direction of W plus a trained magnitude per output row and per input column, and the head"
    paper = "Wang et al. 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation, arXiv 2412.06441"
    formula = "r*(d_in+d_out) + d_in + d_out per target layer + head"
    identity_at_init = True
    default_lr = 5e-4
    layer = BoraLinear
    hparams = (
        HParam("r", int, 8, "rank of the direction update B A (r <= min(d_in, d_out))", low=1, size=True),
        HParam("alpha", float, 16, "direction update scaled by alpha/r", low=0.0, open_low=True),
        HParam("dropout", float, 0.05, "dropout on the low-rank branch's input", low=0.0, high=1.0),
        TARGET_MODULES,
    )
