"""Loaders of the bias benchmarks under $PEFTLAB_DATA_DIR/bias/: CrowS-Pairs sentence pairs, WinoBias
pro/anti-stereotyped twins and BBQ questions with the metadata its bias score needs."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from peftlab import settings
from peftlab.errors import UserError
from peftlab.workers.tasks.multiple_choice import BBQ, MultipleChoiceSpec, Questions, bbq_frames, question_columns, read_questions

FOLDERS = {"crows_pairs": "bias/crows_pairs", "winobias": "bias/winobias", "bbq": BBQ.folder}
CROWS_FILE = "crows_pairs_anonymized.csv"
CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
WINOBIAS_TYPES = (1, 2)
WINOBIAS_SPLITS = ("dev", "test")


def folder(name: str, data_dir: Path | None = None) -> Path:
    """The existing folder of a bias data set ("crows_pairs", "winobias", "bbq"); UserError otherwise."""
    root = data_dir or settings.data_dir()
    if root is None:
        raise UserError(f"bias data set '{name}' needs its files: set {settings.ENV_DATA} to a folder holding "
                        f"{FOLDERS[name]}/")
    path = Path(root) / FOLDERS[name]
    if not path.is_dir():
        raise UserError(f"bias data set '{name}': folder {path} not found (set {settings.ENV_DATA} to the folder "
                        f"holding {FOLDERS[name]}/)")
    return path


def _file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"bias data file {path} not found (set {settings.ENV_DATA} to the folder holding bias/)")
    return path


def subset(count: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of `limit` of `count` items (all of them when limit is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise UserError(f"limit must be at least 1, not {limit}")
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


@dataclass(frozen=True)
class CrowsPair:
    """sent_more is the more stereotypical sentence whatever the direction (stereo: it shows a
    stereotype of a disadvantaged group; antistereo: its twin, sent_less, violates one)."""

    more: str
    less: str
    direction: str
    bias_type: str


def load_crows_pairs(data_dir: Path | None = None, *, limit: int | None = None, seed: int = 0) -> list[CrowsPair]:
    """CrowS-Pairs (Nangia et al. 2020): 1,508 minimal pairs over 9 bias types."""
    path = _file(folder("crows_pairs", data_dir) / CROWS_FILE)
    frame = pd.read_csv(path, index_col=0)
    if missing := [c for c in CROWS_COLUMNS if c not in frame.columns]:
        raise UserError(f"{path}: columns {', '.join(missing)} missing (has: {', '.join(map(str, frame.columns))})")
    rows = frame.iloc[subset(len(frame), limit, seed)]
    return [CrowsPair(str(r.sent_more), str(r.sent_less), str(r.stereo_antistereo), str(r.bias_type))
            for r in rows.itertuples(index=False)]


@dataclass(frozen=True)
class WinoPair:
    """A pro-stereotyped sentence and its anti-stereotyped twin (only the pronoun differs), brackets removed."""

    pro: str
    anti: str
    kind: int
    """WinoBias type: 1 (resolved by world knowledge) or 2 (by syntax)."""


_NUMBER = re.compile(r"^\s*\d+\s+")


def _wino_sentences(path: Path) -> list[str]:
    lines = [line for line in _file(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join(_NUMBER.sub("", line).replace("[", "").replace("]", "").split()) for line in lines]


def load_winobias(data_dir: Path | None = None, *, split: str = "test", limit: int | None = None,
                  seed: int = 0) -> list[WinoPair]:
    """WinoBias (Zhao et al. 2018): pro_/anti_stereotyped_type{1,2}.txt.<split>, aligned line by line."""
    if split not in WINOBIAS_SPLITS:
        raise UserError(f"winobias split must be one of {', '.join(WINOBIAS_SPLITS)}, not '{split}'")
    root = folder("winobias", data_dir)
    pairs = []
    for kind in WINOBIAS_TYPES:
        pro = _wino_sentences(root / f"pro_stereotyped_type{kind}.txt.{split}")
        anti = _wino_sentences(root / f"anti_stereotyped_type{kind}.txt.{split}")
        if len(pro) != len(anti):
            raise UserError(f"{root}: type{kind} {split} has {len(pro)} pro- and {len(anti)} anti-stereotyped "
                            "sentences; they must pair line by line")
        pairs += [WinoPair(p, a, kind) for p, a in zip(pro, anti, strict=True)]
    return [pairs[i] for i in subset(len(pairs), limit, seed)]


@dataclass
class BbqSet:
    """BBQ questions as the multiple-choice task encodes them, plus per question the positions of
    the 'unknown' answer and of the biased answer (None where the metadata names no single one)."""

    questions: Questions
    unknown: list[int]
    biased: list[int | None]
    categories: list[str]

    @property
    def ambiguous(self) -> list[bool]:
        return [c == "ambiguous" for c in self.questions.conditions]


def answer_roles(answer_info: dict, stereotyped_groups: list[str], polarity: str) -> tuple[int, int | None]:
    """(unknown answer's position, biased answer's position or None) of one BBQ question.

    The target is the one non-unknown answer whose group label or text names a stereotyped group;
    a negative question's biased answer is the target, a non-negative one's is the other answer.
    """
    groups = {g.lower() for g in stereotyped_groups}
    roles = [answer_info[f"ans{k}"] for k in range(3)]
    unknown = [k for k, (_, group) in enumerate(roles) if group.lower() == "unknown"]
    if len(unknown) != 1:
        raise UserError(f"bbq: answer_info {answer_info} does not mark exactly one answer 'unknown'")
    others = [k for k in range(3) if k != unknown[0]]
    targets = [k for k in others if {roles[k][0].lower(), roles[k][1].lower()} & groups]
    if len(targets) != 1:
        return unknown[0], None
    target = targets[0]
    return unknown[0], target if polarity == "neg" else next(k for k in others if k != target)


def load_bbq(data_dir: Path | None = None, *, categories: list[str] | None = None, limit: int | None = None,
             seed: int = 0, unseen_by: set[str] | None = None) -> BbqSet:
    """BBQ (Parrish et al. 2022): every category file present (or `categories`), read by the
    multiple-choice task's own loader; without the questions whose context is in `unseen_by` (the
    contexts a model trained on, when its task is BBQ itself)."""
    root = folder("bbq", data_dir)
    spec = MultipleChoiceSpec(dataset="bbq", categories=categories)
    frame = bbq_frames(spec, data_dir)
    if unseen_by:
        frame = frame[~frame["context"].isin(unseen_by)].reset_index(drop=True)
    frame = frame.iloc[subset(len(frame), limit, seed)].reset_index(drop=True)
    questions = read_questions(frame, question_columns(spec, True), ["ans0", "ans1", "ans2"], f"bbq ({root})")
    roles = [answer_roles(info, meta["stereotyped_groups"], polarity) for info, meta, polarity in
             zip(frame["answer_info"], frame["additional_metadata"], frame["question_polarity"], strict=True)]
    return BbqSet(questions, [u for u, _ in roles], [b for _, b in roles], frame["category"].astype(str).tolist())
