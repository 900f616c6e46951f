"""Train, validation and test row indices of every data set: official splits where a source has
them, otherwise seeded, stratified carve-outs of the training rows.

The carve-outs use a fixed split seed, never a trial's seed, so every trial of a sweep trains,
searches and is tested on the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peftlab.errors import UserError

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 0


@dataclass(frozen=True)
class SplitIndices:
    """Row indices into the source's rows laid end to end: train, then validation, then test."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)) for split in SPLITS}


def stratified_pick(labels: np.ndarray | None, rows: int, size: int, rng: np.random.Generator, *,
                    keep_one: bool = False) -> np.ndarray:
    """Sorted positions of `size` of `rows` rows; with labels each class gives its proportional
    share (largest remainder), without them a plain seeded sample. `keep_one` leaves every class at
    least one row outside the pick (a carve-out never takes a class's last training example)."""
    if labels is None:
        return np.sort(rng.permutation(rows)[:size])
    classes, counts = np.unique(labels, return_counts=True)
    cap = counts - 1 if keep_one else counts
    exact = counts * size / len(labels)
    shares = np.minimum(np.floor(exact).astype(int), cap)
    left = size - int(shares.sum())
    for c in np.argsort(-(exact - shares), kind="stable"):
        if left == 0:
            break
        if shares[c] < cap[c]:
            shares[c], left = shares[c] + 1, left - 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, shares)]
    return np.sort(np.concatenate(picked))


def _carve(pool: np.ndarray, labels: np.ndarray | None, fraction: float, what: str, where: str,
           rng: np.random.Generator, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) positions of `pool`: a stratified `fraction` of it is carved out, or, with
    `groups`, a `fraction` of its groups (every row of a carved group goes)."""
    if groups is not None:
        names = np.unique(groups[pool])
        size = max(1, round(len(names) * fraction))
        if size >= len(names):
            raise UserError(f"dataset '{where}' has {len(names)} groups of training rows, too few to carve out "
                            f"a {what} split")
        carved = np.isin(groups[pool], names[np.sort(rng.permutation(len(names))[:size])])
        return pool[~carved], pool[carved]
    size = max(1, round(len(pool) * fraction))
    if size >= len(pool):
        raise UserError(f"dataset '{where}' has {len(pool)} training rows, too few to carve out a {what} split")
    carved_at = stratified_pick(None if labels is None else labels[pool], len(pool), size, rng, keep_one=True)
    mask = np.ones(len(pool), dtype=bool)
    mask[carved_at] = False
    return pool[mask], pool[carved_at]


def three_way(n_train: int, n_validation: int | None, n_test: int | None, *, where: str,
              labels: np.ndarray | None = None, validation_fraction: float = 0.1, test_fraction: float = 0.1,
              max_train: int | None = None, max_eval: int | None = None,
              seed: int = SPLIT_SEED, groups: np.ndarray | None = None) -> SplitIndices:
    """The three splits of a source with `n_train` training rows and, where it has them, official
    validation and test rows (None: carved from training, test first, each stratified by `labels`,
    the labels of all rows in order, or by `groups`, a group key per row: rows of one group, such as
    the variants of one question template, never straddle two splits). `max_train` / `max_eval`
    keep a seeded subset of the training rows / of validation and of test."""
    rng = np.random.default_rng([seed, 0])
    pool = np.arange(n_train)
    start = n_train
    if n_validation is None:
        validation = None
    else:
        validation, start = np.arange(start, start + n_validation), start + n_validation
    if n_test is None:
        pool, test = _carve(pool, labels, test_fraction, "test", where, rng, groups)
    else:
        test = np.arange(start, start + n_test)
    if validation is None:
        pool, validation = _carve(pool, labels, validation_fraction, "validation", where, rng, groups)
    for split, rows in (("train", pool), ("validation", validation), ("test", test)):
        if len(rows) == 0:
            raise UserError(f"dataset '{where}' has an empty {split} split")
    return SplitIndices(train=_subsample(pool, max_train, np.random.default_rng([seed, 1])),
                        validation=_subsample(validation, max_eval, np.random.default_rng([seed, 2])),
                        test=_subsample(test, max_eval, np.random.default_rng([seed, 3])))


def _subsample(indices: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= len(indices):
        return indices
    return indices[rng.permutation(len(indices))[:limit]]  # the first N of one shuffle: nested caps


def check_fraction(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UserError(f"{key} must be between 0 and 1 (exclusive), got {value}")
