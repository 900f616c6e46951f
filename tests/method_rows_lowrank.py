"""Contract-table rows for the low-rank methods implemented here: BoRA, Spectral^A and Spectral^R,
with parameter formulas written by hand from METHODS.md and the tiny models' linear shapes."""
from __future__ import annotations

from collections.abc import Callable

from method_table import Case, head, linears
from torch import nn

PerLayer = Callable[[int, int], int]  # (d_in, d_out) -> trainable parameters added to that layer


def per_layer(formula: PerLayer, names: tuple[str, ...] | None) -> Callable[[nn.Module], int]:
    """Head plus formula summed over the target linear layers; names None means all linear layers."""
    keep = (lambda n: True) if names is None else (lambda n: n.rsplit(".", 1)[-1] in names)
    return lambda m: head(m) + sum(formula(l.in_features, l.out_features) for l in linears(m, keep))


def owned(prefix: str) -> Callable[[str], bool]:
    return lambda n: f".{prefix}" in n or n.startswith("classifier.")


def bora(r: int) -> PerLayer:
    return lambda d_in, d_out: r * (d_in + d_out) + d_in + d_out


def spectral_add(r: int) -> PerLayer:
    return lambda d_in, d_out: r * (d_in + d_out)


def spectral_rot(r: int, scale: bool) -> PerLayer:
    return lambda d_in, d_out: 2 * r * r + (r if scale else 0)


QV = ("query", "value")

ROWS = [
    Case("bora", {"r": 4, "alpha": 8, "dropout": 0.0}, per_layer(bora(4), QV), owned("bora_")),
    Case(
        "bora", {"r": 3, "target_modules": "all-linear"}, per_layer(bora(3), None), owned("bora_"),
        id="bora-all-linear",
    ),
    Case("spectral_add", {"r": 4}, per_layer(spectral_add(4), QV), owned("spectral_")),
    Case(
        "spectral_add", {"r": 5, "target_modules": ["key", "dense"]},
        per_layer(spectral_add(5), ("key", "dense")), owned("spectral_"), id="spectral_add-key-dense",
    ),
    Case("spectral_rot", {"r": 4}, per_layer(spectral_rot(4, True), QV), owned("spectral_")),
    Case("spectral_rot", {"r": 4, "scale": False}, per_layer(spectral_rot(4, False), QV), owned("spectral_"),
         id="spectral_rot-no-scale"),
    Case(
        "spectral_rot", {"r": 3, "scale": True, "target_modules": "all-linear"},
        per_layer(spectral_rot(3, True), None), owned("spectral_"), id="spectral_rot-scale-all-linear",
    ),
]
