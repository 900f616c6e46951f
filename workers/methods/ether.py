"""ETHER and ETHER+: block-diagonal hyperplane reflections of a target layer's input (and output) space.
W' = W blockdiag(H_1..H_n), applied to x block by block, so no d_in x d_in matrix is ever built."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import HParam
from .registry import register
from .wrapped import TARGET_MODULES, AdaptedLinear, LinearWrapping

N_BLOCKS = HParam(
    "n_blocks", int, 4,
    "number of diagonal blocks the transformed dimension is split into (each with its own vector); must divide "
    "d_in of every target layer (and d_out for two-sided ETHER+). The parameter count does not depend on it; "
    "more blocks cost less compute and give a less global transform",
    low=1,
)


def _projection(xb: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u u^T x / ||u||^2 for every block: xb (..., n, k), u (n, k)."""
    return (xb * u).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u


def block_transform(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """blockdiag(H_1..H_n) applied to the last dimension of x (the rows of a weight, or activations).

    v None (ETHER): H_i = I - 2 u_i u_i^T/||u_i||^2, a reflection. v given (ETHER+):
    H_i = I - u_i u_i^T/||u_i||^2 + v_i v_i^T/||v_i||^2. Each H_i is symmetric, so applying it to the
    rows of W gives W H. The ETHER+ difference is formed before adding x, so that v = -u gives x exactly.
    """
    xb = x.unflatten(-1, tuple(u.shape))
    update = -2 * _projection(xb, u) if v is None else _projection(xb, v) - _projection(xb, u)
    return (xb + update).flatten(-2)


def initial_vectors(n: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """n vectors of length k, kaiming-uniform as in mwbini/ether: U(-1/sqrt(k), 1/sqrt(k)), norm about
    0.58. Only their directions enter H, but Adam turns a vector by about lr * sqrt(k) / ||u|| per step,
    so a standard normal start (norm sqrt(k)) would move it sqrt(3k) times more slowly."""
    u = torch.empty(n, k, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    return u


class EtherLinear(AdaptedLinear):
    """ETHER: y = W blockdiag(H_1..H_n) x + b, H_i = I - 2 u_i u_i^T/(u_i^T u_i).

    A reflection is never the identity (||H_i - I||_F = 2 for any u_i), so the adapted model differs
    from the frozen one at step 0; u_i starts kaiming-uniform (initial_vectors).
    """

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        n = hp["n_blocks"]
        self.ether_u = nn.Parameter(initial_vectors(n, base.in_features // n, base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reflecting x costs O(tokens * d_in); materialising W' would cost O(d_out * d_in) per step.
        return self.base(block_transform(x, self.ether_u))

    def adapted_weight(self) -> torch.Tensor:
        return block_transform(self.base.weight, self.ether_u)

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return d_in


class EtherPlusLinear(AdaptedLinear):
    """ETHER+: y = H_out W H_in x + b (sides=2) or W H_in x + b (sides=1), H = blockdiag of
    I - u u^T/||u||^2 + v v^T/||v||^2. v starts as -u, so H = I at init; H is not orthogonal once trained."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        n = hp["n_blocks"]
        self.ether_u_in = nn.Parameter(initial_vectors(n, base.in_features // n, base.weight))
        self.ether_v_in = nn.Parameter(-self.ether_u_in.detach().clone())
        self.two_sided = hp["sides"] == 2
        if self.two_sided:
            self.ether_u_out = nn.Parameter(initial_vectors(n, base.out_features // n, base.weight))
            self.ether_v_out = nn.Parameter(-self.ether_u_out.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = block_transform(x, self.ether_u_in, self.ether_v_in)
        if not self.two_sided:
            return self.base(x)
        y = block_transform(F.linear(x, self.base.weight), self.ether_u_out, self.ether_v_out)
        return y if self.base.bias is None else y + self.base.bias  # the bias is not transformed

    def adapted_weight(self) -> torch.Tensor:
        w = block_transform(self.base.weight, self.ether_u_in, self.ether_v_in)  # W H_in
        if self.two_sided:  # H_out (W H_in) = ((W H_in)^T H_out)^T, H_out symmetric
            w = block_transform(w.T, self.ether_u_out, self.ether_v_out).T
        return w

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return 2 * (d_in + d_out) if hp["sides"] == 2 else 2 * d_in


def _divisibility_problems(n: int, shapes: list[tuple[int, int]], output_side: bool) -> list[str]:
    bad = sorted({(d_in, d_out) for d_in, d_out in shapes if d_in % n or (output_side and d_out % n)})
    if not bad:
        return []
    what = "d_in and d_out" if output_side else "d_in"
    shapes = ", ".join(f"{i} -> {o}" for i, o in bad)
    return [f"n_blocks={n} must divide {what} of every target layer; it does not for layers of shape "
            f"(d_in -> d_out) {shapes}: choose another n_blocks or other target_modules"]


@register
class Ether(LinearWrapping):
    name = "ether"
    summary = "a block-diagonal Householder reflection of each target layer's input space, and the head"
    paper = ("Bini, Roth, Akata, Khoreva 2024, ETHER: Efficient Finetuning of Large-Scale Models with "
             "Hyperplane Reflections, arXiv 2405.20271")
    formula = "d_in per target layer (independent of n_blocks) + head"
    identity_at_init = False  # a reflection: ||H_i - I||_F = 2 whatever u_i is
    default_lr = 3e-3  # the paper reports ETHER as robust to large learning rates
    layer = EtherLinear
    hparams = (N_BLOCKS, TARGET_MODULES)

    def _layer_problems(self, shapes: list[tuple[int, int]], hp: dict) -> list[str]:
        return _divisibility_problems(hp["n_blocks"], shapes, output_side=False)


@register
class EtherPlus(LinearWrapping):
    name = "ether_plus"
    summary = "ETHER+: relaxed block reflections I - uu^T/(u^T u) + vv^T/(v^T v) on one or both sides, and the head"
    paper = Ether.paper
    formula = "2*d_in per target layer (sides=1) or 2*(d_in+d_out) (sides=2) + head"
    identity_at_init = True
    default_lr = 3e-3
    layer = EtherPlusLinear
    hparams = (
        N_BLOCKS,
        HParam("sides", int, 1, "1: W' = W H_in (input side); 2: W' = H_out W H_in", low=1, high=2),
        TARGET_MODULES,
    )

    def _layer_problems(self, shapes: list[tuple[int, int]], hp: dict) -> list[str]:
        return _divisibility_problems(hp["n_blocks"], shapes, output_side=hp["sides"] == 2)
