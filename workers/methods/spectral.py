"""Spectral Adapter (Zhang & Pilanci 2024): tune the top-r singular vectors of each target W, additively
(spectral_add) or by Cayley rotations (spectral_rot); the SVD is taken once, at apply time.

Both write W = U_r S_r V_r^T + W_rest (top-r SVD, W_rest fixed) and only move the top-r part, so
W' - W is a rank-<=2r (additive) or rank-<=r (rotational) correction. The forwards use exactly that:
W' x = W x + (low-rank terms), never a dense W'. W_rest is therefore never stored: it only ever
appears as W - U_r S_r V_r^T, and W' = W + (new top part - old top part) is the same matrix without
a second d_out x d_in copy or its round-off.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import HParam, TaskInfo
from .registry import register
from .wrapped import TARGET_MODULES, AdaptedLinear, LinearWrapping, linear_dims, target_names

RANK = HParam("r", int, 8, "number of top singular directions tuned (r <= min(d_in, d_out))", low=1, size=True)


def rank_problems(model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
    """One problem naming every target layer too small for rank r (the SVD has only min(d_in, d_out))."""
    modules = dict(model.named_modules())
    small = [
        f"{n} ({dims[1]}x{dims[0]})"
        for n in target_names(model, hp["target_modules"], task)
        if (dims := linear_dims(modules[n])) is not None and hp["r"] > min(dims)
    ]
    if not small:
        return []
    return [(f"r={hp['r']} exceeds min(d_out, d_in) of target layer(s) {', '.join(small)}; lower r or "
             f"leave those layers out of target_modules")]


class RankedWrapping(LinearWrapping):
    """LinearWrapping whose rank r must fit every target layer."""

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        return super()._problems(model, hp, task) + rank_problems(model, hp, task)


def top_singular(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (d_out x r), S_r (r), V_r (d_in x r) of W, computed in float32 and returned in W's dtype.

    An SVD fixes each singular pair only up to a joint sign; we pick the sign that makes the largest
    entry of each U column positive, so that re-applying to the same W on reload (or on another
    LAPACK/cuSOLVER) pairs the saved dU/dV or P/R with the same vectors.
    """
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vh[:r].T
    sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))
    sign[sign == 0] = 1
    return tuple(t.to(weight.dtype).contiguous() for t in (U * sign, S, V * sign))


class SpectralLinear(AdaptedLinear):
    """Holds the frozen top-r factors as buffers. They are not persistent (not in state_dict or the
    saved adapter): load re-applies the method to the same W and recomputes them."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        U, S, V = top_singular(base.weight, hp["r"])
        self.register_buffer("svd_U", U, persistent=False)
        self.register_buffer("svd_S", S, persistent=False)
        self.register_buffer("svd_V", V, persistent=False)


class SpectralAddLinear(SpectralLinear):
    """W' = (U_r + dU) S_r (V_r + dV)^T + W_rest = W + U_r S_r dV^T + dU S_r (V_r + dV)^T; dU, dV start at 0."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        self.spectral_dU = nn.Parameter(torch.zeros_like(self.svd_U))
        self.spectral_dV = nn.Parameter(torch.zeros_like(self.svd_V))

    def adapted_weight(self) -> torch.Tensor:
        U, S, V, dU, dV = self.svd_U, self.svd_S, self.svd_V, self.spectral_dU, self.spectral_dV
        return self.base.weight + (U * S) @ dV.T + (dU * S) @ (V + dV).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W x + U S (dV^T x) + dU S ((V + dV)^T x), as one rank-2r LoRA: [a, b] = x [V, dV], then
        # [b S, (a + b) S] [U, dU]^T. Cost over the frozen layer: 2r (d_in + d_out) MACs per token,
        # twice LoRA's r (d_in + d_out), plus two (d x 2r) concatenations per step.
        r = self.svd_S.shape[0]
        a, b = (x @ torch.cat([self.svd_V, self.spectral_dV], dim=1)).split(r, dim=-1)
        coef = torch.cat([b * self.svd_S, (a + b) * self.svd_S], dim=-1)
        return self.base(x) + coef @ torch.cat([self.svd_U, self.spectral_dU], dim=1).T

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return hp["r"] * (d_in + d_out)


def cayley(X: torch.Tensor) -> torch.Tensor:
    """Q(X) = (I - K)(I + K)^-1 with K = (X - X^T)/2, for one r x r X or a batch of them: orthogonal for
    any X, Q(0) = I. I + K is invertible (K is skew-symmetric) and commutes with I - K, so
    Q = solve(I + K, I - K); solve_ex skips the singularity check, a host-device sync on GPU. In float32."""
    K = (X.float() - X.float().mT) / 2
    eye = torch.eye(X.shape[-1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve_ex(eye + K, eye - K, check_errors=False)[0].to(X.dtype)


class SpectralRotLinear(SpectralLinear):
    """W' = (U_r Q(P)) diag(S_r * scale) (V_r Q(R))^T + W_rest = W + U_r M V_r^T,
    M = Q(P) diag(S_r * scale) Q(R)^T - diag(S_r); P, R start at 0 (Q = I), scale at 1 (trained by default)."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        r = hp["r"]
        self.spectral_P = nn.Parameter(torch.zeros(r, r, dtype=base.weight.dtype, device=base.weight.device))
        self.spectral_R = nn.Parameter(torch.zeros_like(self.spectral_P))
        self.spectral_scale = nn.Parameter(torch.ones_like(self.svd_S)) if hp["scale"] else None

    def core(self) -> torch.Tensor:
        """M (r x r), the change of the top part in the singular bases."""
        sigma = self.svd_S if self.spectral_scale is None else self.svd_S * self.spectral_scale
        q_p, q_r = cayley(torch.stack([self.spectral_P, self.spectral_R])).unbind(0)  # one batched solve
        return (q_p * sigma) @ q_r.T - torch.diag(self.svd_S)

    def adapted_weight(self) -> torch.Tensor:
        return self.base.weight + self.svd_U @ self.core() @ self.svd_V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W x + ((x V_r) M^T) U_r^T with U_r M folded first (d_out r^2): the same per-token cost as LoRA
        # at rank r, plus one batched solve of two r x r systems per step.
        return self.base(x) + (x @ self.svd_V) @ (self.svd_U @ self.core()).T

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return 2 * hp["r"] ** 2 + (hp["r"] if hp["scale"] else 0)


@register
class SpectralAdd(RankedWrapping):
    name = "spectral_add"
    summary = "additive updates dU, dV to the top-r singular vectors of the target layers, and the head"
    paper = "Zhang & Pilanci 2024, Spectral Adapter: Fine-Tuning in Spectral Space, arXiv 2405.13952"
    formula = "r*(d_in+d_out) per target layer + head"
    identity_at_init = True
    default_lr = 5e-4
    layer = SpectralAddLinear
    hparams = (RANK, TARGET_MODULES)


@register
class SpectralRot(RankedWrapping):
    name = "spectral_rot"
    summary = "Cayley rotations of the top-r left and right singular vectors of the target layers, and the head"
    paper = "Zhang & Pilanci 2024, Spectral Adapter: Fine-Tuning in Spectral Space, arXiv 2405.13952"
    formula = "2*r^2 (+ r with scale) per target layer + head"
    identity_at_init = True
    default_lr = 1e-3
    layer = SpectralRotLinear
    hparams = (
        RANK,
        HParam("scale", bool, True, "also train a scale per singular value (length r, starts at 1), as the "
               "reference code does"),
        TARGET_MODULES,
    )
