"""Direct math checks of BoRA, Spectral^A and Spectral^R on single nn.Linear layers: W' written out by
hand from METHODS.md's equations, identity at init, orthogonality and the norms the magnitudes fix."""
from __future__ import annotations

import pytest
import torch
from peftlab.workers.methods import get_method
from peftlab.workers.methods.bora import BoraLinear
from peftlab.workers.methods.spectral import (
    SpectralAddLinear,
    SpectralRotLinear,
    cayley,
)
from tiny_models import CONFIGS, build_meta, task_for
from torch import nn
from torch.nn import functional as F

SHAPES = [(5, 7), (7, 5), (37, 32), (6, 6)]  # (d_out, d_in)


def linear(d_out: int, d_in: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def randomise(layer: nn.Module, seed: int = 1) -> None:
    """Every trainable tensor moved off its init, so W' != W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def make(kind: str, d_out: int, d_in: int, r: int = 2) -> nn.Module:
    base = linear(d_out, d_in)
    if kind == "bora":
        return BoraLinear(base, {"r": r, "alpha": 4.0, "dropout": 0.0})
    if kind == "spectral_add":
        return SpectralAddLinear(base, {"r": r})
    return SpectralRotLinear(base, {"r": r, "scale": kind == "spectral_rot_scale"})


KINDS = ["bora", "spectral_add", "spectral_rot", "spectral_rot_scale"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_init(kind, shape):
    layer = make(kind, *shape)
    torch.testing.assert_close(layer.adapted_weight(), layer.base.weight, atol=1e-5, rtol=0)
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(layer(x), layer.base(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_forward_equals_dense_weight_values_and_gradients(kind):
    """The forward's low-rank form is W' x + b, with the same gradients (BoRA's norms detached in both)."""
    dense, fast = make(kind, 5, 7), make(kind, 5, 7)
    randomise(dense), randomise(fast)
    x = torch.randn(3, 4, 7)
    y_dense = F.linear(x, dense.adapted_weight(), dense.base.bias)
    y_fast = fast(x)
    torch.testing.assert_close(y_fast, y_dense, atol=1e-5, rtol=1e-5)
    (y_dense ** 2).sum().backward()
    (y_fast ** 2).sum().backward()
    for (name, a), b in zip(dense.named_parameters(), fast.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_spectral_factors_are_the_top_r_svd():
    layer = make("spectral_add", 5, 7, r=3)
    W, U, S, V = layer.base.weight, layer.svd_U, layer.svd_S, layer.svd_V
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:3])
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(W @ V, U * S, atol=1e-5, rtol=0)
    assert not any(n.startswith("svd_") for n in layer.state_dict())  # recomputed on load, not saved


def test_spectral_add_dense_formula():
    layer = make("spectral_add", 5, 7, r=2)
    randomise(layer)
    W, U, S, V = layer.base.weight, layer.svd_U, layer.svd_S, layer.svd_V
    rest = W - U @ torch.diag(S) @ V.T  # W_rest, fixed
    expected = (U + layer.spectral_dU) @ torch.diag(S) @ (V + layer.spectral_dV).T + rest
    torch.testing.assert_close(layer.adapted_weight(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_cayley_is_orthogonal(r):
    P = torch.randn(r, r, generator=torch.Generator().manual_seed(r))
    Q = cayley(P)
    torch.testing.assert_close(Q.T @ Q, torch.eye(r), atol=1e-5, rtol=0)
    K = (P - P.T) / 2
    torch.testing.assert_close(Q, (torch.eye(r) - K) @ torch.linalg.inv(torch.eye(r) + K), atol=1e-5, rtol=0)
    assert torch.equal(cayley(torch.zeros(r, r)), torch.eye(r))


@pytest.mark.parametrize("scale", [False, True])
def test_spectral_rot_dense_formula(scale):
    layer = make("spectral_rot_scale" if scale else "spectral_rot", 5, 7, r=3)
    randomise(layer)
    W, U, S, V = layer.base.weight, layer.svd_U, layer.svd_S, layer.svd_V
    rest = W - U @ torch.diag(S) @ V.T

    def Q(X):
        K = (X - X.T) / 2
        return (torch.eye(3) - K) @ torch.linalg.inv(torch.eye(3) + K)

    sigma = S * layer.spectral_scale if scale else S
    expected = (U @ Q(layer.spectral_P)) @ torch.diag(sigma) @ (V @ Q(layer.spectral_R)).T + rest
    torch.testing.assert_close(layer.adapted_weight(), expected, atol=1e-5, rtol=0)
    # The rotation keeps the singular values of the top part (times the scale).
    top = layer.adapted_weight() - rest
    expected_values = sigma.abs().sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(top)[:3], expected_values, atol=1e-5, rtol=0)


def test_bora_dense_formula():
    layer = make("bora", 5, 7, r=2)
    randomise(layer)
    W, A, B = layer.base.weight, layer.bora_A, layer.bora_B
    V = W + (4.0 / 2) * B @ A
    V1 = layer.bora_m_row[:, None] * V / V.norm(dim=1, keepdim=True)
    expected = V1 * layer.bora_m_col / V1.norm(dim=0, keepdim=True)
    torch.testing.assert_close(layer.adapted_weight(), expected, atol=1e-5, rtol=0)


def test_bora_norms_are_the_magnitudes():
    layer = make("bora", 7, 5, r=2)
    with torch.no_grad():  # magnitudes at init are W's row and column norms
        torch.testing.assert_close(layer.bora_m_row, layer.base.weight.norm(dim=1))
        torch.testing.assert_close(layer.bora_m_col, layer.base.weight.norm(dim=0))
    randomise(layer)
    with torch.no_grad():
        layer.bora_m_row.abs_(), layer.bora_m_col.abs_()
        V = layer.direction()
        V1 = V * (layer.bora_m_row / V.norm(dim=1))[:, None]  # after the row step
        torch.testing.assert_close(V1.norm(dim=1), layer.bora_m_row)
        torch.testing.assert_close(layer.adapted_weight().norm(dim=0), layer.bora_m_col)  # after the column step


@pytest.mark.parametrize("method", ["bora", "spectral_add", "spectral_rot"])
def test_rank_above_layer_size_names_the_layers(method):
    config = CONFIGS["bert"]()  # hidden 32
    problems = get_method(method).check_applicable(build_meta(config), {"r": 33}, task_for(config))
    assert len(problems) == 1
    assert "r=33 exceeds" in problems[0] and "bert.encoder.layer.0.attention.self.query (32x32)" in problems[0]
    assert get_method(method).check_applicable(build_meta(config), {"r": 32}, task_for(config)) == []
