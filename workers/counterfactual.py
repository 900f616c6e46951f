"""Counterfactual data augmentation (CDA): gender and race word swaps that turn a sentence into its
counterfactual twin, for debiasing stages that train on both.

The word lists are written for peftlab after the attribute-word lists of bias-bench (Meade et al.
2022, "An Empirical Survey of the Effectiveness of Debiasing Techniques for Pre-trained Language
Models", github.com/McGill-NLP/bias-bench, data/bias_attribute_words.json, MIT licence), whose CDA
PEFTDebias (Agarwal et al. 2023) follows: gender as two-sided pairs (Zhao et al. 2018's swap), race
as triples rotated one place. They are a subset, not that file.
"""
from __future__ import annotations

import re

GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
    ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
    ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("uncle", "aunt"), ("uncles", "aunts"),
    ("nephew", "niece"), ("nephews", "nieces"), ("grandfather", "grandmother"), ("grandson", "granddaughter"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("mr", "mrs"), ("male", "female"), ("males", "females"),
    ("boyfriend", "girlfriend"), ("dad", "mom"), ("dads", "moms"), ("sir", "madam"), ("actor", "actress"),
    ("actors", "actresses"), ("prince", "princess"), ("groom", "bride"), ("stepfather", "stepmother"),
    ("masculine", "feminine"), ("fraternity", "sorority"), ("businessman", "businesswoman"),
    ("chairman", "chairwoman"), ("spokesman", "spokeswoman"), ("waiter", "waitress"), ("hero", "heroine"),
)
"""Male word, female word. "her" stands for both "him" and "his"; swapped, it becomes "his"."""

RACE_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("black", "white", "asian"), ("blacks", "whites", "asians"), ("african", "caucasian", "asian"),
    ("africa", "europe", "asia"), ("africans", "europeans", "asians"),
)
"""Each word is replaced by the next one of its triple (the last by the first)."""

AXES = ("gender", "race")


def _swaps(axes: list[str]) -> dict[str, str]:
    table: dict[str, str] = {}
    if "gender" in axes:
        for male, female in GENDER_PAIRS:
            table.setdefault(male, female)
            table.setdefault(female, "his" if female == "her" else male)
    if "race" in axes:
        for triple in RACE_TRIPLES:
            for i, word in enumerate(triple):
                table.setdefault(word, triple[(i + 1) % len(triple)])
    return table


def _cased(source: str, target: str) -> str:
    if source.isupper() and len(source) > 1:
        return target.upper()
    return target.capitalize() if source[:1].isupper() else target


def counterfactual(text: str, axes: list[str]) -> str | None:
    """The sentence with every attribute word of `axes` swapped (case kept), or None when it has none."""
    table = _swaps(axes)
    found = False

    def swap(match: re.Match) -> str:
        nonlocal found
        word = match.group(0)
        target = table.get(word.lower())
        if target is None:
            return word
        found = True
        return _cased(word, target)

    out = re.sub(r"[A-Za-z]+", swap, text)
    return out if found else None


def augment(texts: list[str], axes: list[str]) -> list[str]:
    """Two-sided CDA: every text that holds an attribute word, followed by its counterfactual; texts
    without one are left out (they carry nothing to debias)."""
    corpus = []
    for text in texts:
        twin = counterfactual(text, axes)
        if twin is not None:
            corpus += [text, twin]
    return corpus
