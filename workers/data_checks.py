"""What `peftlab validate` says about a task's data: rows and class counts per split, and the label
problems worth a warning before a sweep (refused with `--strict`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from peftlab.workers.splits import SPLITS


@dataclass(frozen=True)
class SplitSummary:
    task: str
    split: str
    rows: int
    counts: dict[str, int] | None
    """Examples per class name; None for data without classes (instruction pairs)."""


def _labels(data: Any, split: str) -> list[int] | None:
    labels = getattr(data, f"{split}_labels", None)
    if labels is None:
        return None
    return labels.tolist() if hasattr(labels, "tolist") else list(labels)


def summarize(task: str, data: Any) -> tuple[list[SplitSummary], list[str]]:
    """Each split's size and class counts, and one line per label problem: a class with fewer than
    two training examples, a label seen only outside training, names that differ only by case or
    by surrounding space."""
    names = getattr(data, "label_names", None)
    summaries, warnings = [], []
    counts: dict[str, Counter] = {}
    for split in SPLITS:
        labels = _labels(data, split)
        if labels is None or names is None:
            summaries.append(SplitSummary(task, split, data.sizes[split], None))
            continue
        counts[split] = Counter(names[i] for i in labels)
        summaries.append(SplitSummary(task, split, len(labels), dict(sorted(counts[split].items()))))
    if not counts:
        return summaries, warnings
    scarce = [name for name in names if counts["train"][name] < 2]
    if scarce:
        shown = ", ".join(f"'{n}' ({counts['train'][n]})" for n in scarce[:5])
        warnings.append(f"{task}: {len(scarce)} class(es) with fewer than two training examples: {shown}"
                        f"{', ...' if len(scarce) > 5 else ''}")
    for split in SPLITS[1:]:
        unseen = sorted(set(counts[split]) - set(counts["train"]))
        if unseen:
            warnings.append(f"{task}: label(s) only in {split}, never in training: {', '.join(map(repr, unseen[:5]))}")
    folded: dict[str, list[str]] = {}
    for name in names:
        folded.setdefault(name.casefold(), []).append(name)
    for group in folded.values():
        if len(group) > 1:
            warnings.append(f"{task}: labels {', '.join(map(repr, group))} differ only by case: one class or several?")
    for name, spellings in getattr(data, "label_variants", {}).items():
        warnings.append(f"{task}: labels {', '.join(map(repr, spellings))} differ only by surrounding space "
                        f"and are read as one class {name!r}")
    return summaries, warnings
