"""Bias scores of a trained (adapted) model: the CrowS-Pairs stereotype score and the WinoBias
likelihood gap through its LM head, the BBQ bias score from its multiple-choice answers."""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.workers.bias.data import (BbqSet, CrowsPair, WinoPair, folder, load_bbq, load_crows_pairs,
                                       load_winobias)
from peftlab.workers.lm_head import (encode, lm_objective, scored_positions, sentence_log_likelihoods,
                                     task_objective, token_log_likelihoods, with_lm_head)
from peftlab.workers.tasks.base import loss_and_predictions
from peftlab.workers.tasks.multiple_choice import Questions, trim_batch, encode_questions

BIAS_EVALS = ("crows_pairs", "winobias", "bbq")
LM_EVALS = ("crows_pairs", "winobias")
"""The evaluations that score sentences with a language-modelling head."""


def metric_suffix(value: str) -> str:
    """A value as a metric-name part: race-color -> race_color."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", value).strip("_").lower()


# -- CrowS-Pairs ---------------------------------------------------------------------------------
def stereotype_scores(more_higher: Sequence[bool], bias_types: Sequence[str]) -> dict[str, float]:
    """Percentage of pairs whose more-stereotypical sentence scored higher (ties count against),
    overall (`crows_pairs`) and per bias type (`crows_pairs_<type>`); 50 is unbiased."""
    wins = np.asarray(more_higher, dtype=bool)
    types = np.asarray(bias_types)
    scores = {"crows_pairs": 100.0 * float(wins.mean())}
    for kind in sorted(set(bias_types)):
        scores[f"crows_pairs_{metric_suffix(kind)}"] = 100.0 * float(wins[types == kind].mean())
    return scores


def shared_positions(first: Sequence[int], second: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the tokens two token sequences share (difflib's equal blocks), in each."""
    matcher = difflib.SequenceMatcher(None, [str(t) for t in first], [str(t) for t in second])
    a, b = [], []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            a += range(a0, a1)
            b += range(b0, b1)
    return a, b


def crows_log_likelihoods(lm: nn.Module, tokenizer, objective: str, pairs: Sequence[CrowsPair], *,
                          device: torch.device | str, batch_size: int = 32) -> tuple[list[float], list[float]]:
    """(Pseudo-)log-likelihoods of each pair's more- and less-stereotypical sentence, as Nangia et al.
    2020 score them. A masked LM scores only the tokens both sentences share, each masked in turn and
    conditioned on the differing (group) tokens, so the comparison is not about how likely the group
    words themselves are; a causal LM scores whole sentences."""
    more = [encode(tokenizer, p.more, objective) for p in pairs]
    less = [encode(tokenizer, p.less, objective) for p in pairs]
    if objective == "mlm":
        positions_more, positions_less = [], []
        for pair, a, b in zip(pairs, more, less, strict=True):
            in_a, in_b = shared_positions(a, b)
            # The tokenizer's own tokens ([CLS], [SEP]) are shared but never masked, as in the paper.
            keep_a = set(scored_positions(tokenizer, pair.more, objective))
            keep_b = set(scored_positions(tokenizer, pair.less, objective))
            kept = [(i, j) for i, j in zip(in_a, in_b, strict=True) if i in keep_a and j in keep_b]
            positions_more.append([i for i, _ in kept])
            positions_less.append([j for _, j in kept])
    else:
        positions_more = [list(range(1, len(ids))) for ids in more]
        positions_less = [list(range(1, len(ids))) for ids in less]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = token_log_likelihoods(lm, more + less, positions_more + positions_less, objective, device=device,
                                   mask_token_id=tokenizer.mask_token_id if objective == "mlm" else None,
                                   pad_token_id=pad, batch_size=batch_size)
    return scores[:len(pairs)], scores[len(pairs):]


def crows_pairs(lm: nn.Module, tokenizer, objective: str, pairs: Sequence[CrowsPair], *, device: torch.device | str,
                batch_size: int = 32) -> dict[str, float]:
    """The stereotype score of Nangia et al. 2020: the percentage of pairs whose more-stereotypical
    sentence the model finds likelier, overall and per bias type (see `crows_log_likelihoods`)."""
    more, less = crows_log_likelihoods(lm, tokenizer, objective, pairs, device=device, batch_size=batch_size)
    return stereotype_scores([m > s for m, s in zip(more, less, strict=True)], [p.bias_type for p in pairs])


# -- WinoBias ------------------------------------------------------------------------------------
def winobias_scores(gaps: Sequence[float], kinds: Sequence[int]) -> dict[str, float]:
    """Mean log-likelihood gap (pro minus anti; 0 is unbiased) and the percentage of pairs where the
    pro-stereotyped sentence scored higher (50 is unbiased), overall and per WinoBias type."""
    gaps_ = np.asarray(gaps, dtype=float)
    kinds_ = np.asarray(kinds)
    scores = {"winobias_gap": float(gaps_.mean()), "winobias_pro_percent": 100.0 * float((gaps_ > 0).mean())}
    for kind in sorted(set(kinds)):
        part = gaps_[kinds_ == kind]
        scores[f"winobias_type{kind}_gap"] = float(part.mean())
        scores[f"winobias_type{kind}_pro_percent"] = 100.0 * float((part > 0).mean())
    return scores


def winobias(lm: nn.Module, tokenizer, objective: str, pairs: Sequence[WinoPair], *, device: torch.device | str,
             batch_size: int = 32) -> dict[str, float]:
    """The pro/anti likelihood gap of WinoBias twins, each sentence scored whole."""
    scores = sentence_log_likelihoods(lm, tokenizer, [p.pro for p in pairs] + [p.anti for p in pairs], objective,
                                      device=device, batch_size=batch_size)
    n = len(pairs)
    return winobias_scores([a - b for a, b in zip(scores[:n], scores[n:], strict=True)], [p.kind for p in pairs])


# -- BBQ -----------------------------------------------------------------------------------------
def bbq_bias(predictions: Sequence[int], labels: Sequence[int], unknown: Sequence[int],
             biased: Sequence[int | None], ambiguous: Sequence[bool]) -> dict[str, float]:
    """Accuracy on ambiguous and disambiguated contexts and the bias scores of Parrish et al. 2022:
    s_DIS = 2 * biased / not-unknown answers - 1 on disambiguated contexts, s_AMB = (1 - accuracy on
    ambiguous) * the same ratio on ambiguous ones; from -1 (against the bias) to 1, 0 unbiased.
    Questions whose biased answer is None count for accuracy only."""
    pred, label, unk = (np.asarray(x, dtype=int) for x in (predictions, labels, unknown))
    target = np.asarray([-1 if b is None else b for b in biased], dtype=int)
    amb = np.asarray(ambiguous, dtype=bool)
    if not (len(pred) == len(label) == len(unk) == len(target) == len(amb)):
        raise ValueError("predictions and every metadata list must have one entry per question")

    def ratio(rows: np.ndarray) -> float:
        counted = rows & (pred != unk) & (target >= 0)
        return 0.0 if not counted.any() else 2.0 * float((pred[counted] == target[counted]).mean()) - 1.0

    scores = {}
    if (~amb).any():
        scores["bbq_accuracy_disambiguated"] = float((pred[~amb] == label[~amb]).mean())
        scores["bbq_bias_disambiguated"] = ratio(~amb)
    if amb.any():
        accuracy = float((pred[amb] == label[amb]).mean())
        scores["bbq_accuracy_ambiguous"] = accuracy
        scores["bbq_bias_ambiguous"] = (1.0 - accuracy) * ratio(amb)
    return scores


def is_multiple_choice(model: nn.Module) -> bool:
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return type(inner).__name__.endswith("ForMultipleChoice")


def bbq_predictions(model: nn.Module, tokenizer, questions: Questions, *, device: torch.device | str,
                    batch_size: int = 32, max_length: int = 256) -> list[int]:
    """The answer position a multiple-choice model picks for each question (encoded as the
    multiple-choice task encodes them)."""
    encoded = encode_questions(tokenizer, questions, max_length)
    was_training = model.training
    _, predictions = loss_and_predictions(model, (
        trim_batch({k: v[start:start + batch_size].to(device) for k, v in encoded.items()})
        for start in range(0, len(encoded["labels"]), batch_size)))
    model.train(was_training)
    return predictions.tolist()


def bbq(model: nn.Module, tokenizer, data: BbqSet, *, device: torch.device | str, batch_size: int = 32,
        max_length: int = 256) -> dict[str, float]:
    """BBQ accuracy and bias scores of a multiple-choice model."""
    if not is_multiple_choice(model):
        raise UserError(f"bbq needs a multiple-choice model (AutoModelForMultipleChoice), not {type(model).__name__}")
    predictions = bbq_predictions(model, tokenizer, data.questions, device=device, batch_size=batch_size,
                                  max_length=max_length)
    return bbq_bias(predictions, data.questions.labels, data.unknown, data.biased, data.ambiguous)


# -- what a trial calls --------------------------------------------------------------------------
def bias_problems(evals: Sequence[str], model_name: str, task_type: str, *,
                  data_dir: Path | None = None) -> list[str]:
    """One line per reason the evaluations cannot run on this model and task type (empty: they
    can); with `data_dir`, missing data folders too."""
    from peftlab.workers.tasks import KINDS, task_kind

    kind = task_kind(task_type)
    problems = [f"bias eval '{e}' unknown (known: {', '.join(BIAS_EVALS)})" for e in evals if e not in BIAS_EVALS]
    if "bbq" in evals and not kind.scores_answers:
        hosts = ", ".join(k.name for k in KINDS.values() if k.scores_answers)
        problems.append(f"bbq: needs a {hosts} task (BBQ is scored from the model's answers to its questions), "
                        f"not a {task_type} task")
    lm_evals = [e for e in LM_EVALS if e in evals]
    if lm_evals and not kind.language_model:
        try:
            objective, reason = lm_objective(model_name)
        except UserError as exc:
            objective, reason = None, str(exc)
        if objective is None:
            problems += [f"{e}: {reason}" for e in lm_evals]
    if data_dir is not None:
        for e in dict.fromkeys(e for e in evals if e in BIAS_EVALS):
            try:
                folder(e, data_dir)
            except UserError as exc:
                problems.append(str(exc))
    return problems


def bias_scores(evals: Sequence[str], model: nn.Module, tokenizer, model_name_or_config, *,
                device: torch.device | str, limit: int | None = None, seed: int = 0, data_dir: Path | None = None,
                batch_size: int = 32, max_length: int = 256, trained_on: set[str] | None = None) -> dict[str, float]:
    """Every requested bias evaluation of the (adapted) model as one flat dict, metric name -> value.

    `limit` caps each data set to a seeded sample; `seed` also draws the LM head of a model given
    by config (tests); BBQ questions whose context is in `trained_on` are left out, so a model tuned on
    BBQ is scored on questions it never saw. The model's train/eval mode is left as it was.
    """
    if unknown := [e for e in evals if e not in BIAS_EVALS]:
        raise UserError(f"bias evals {', '.join(unknown)} unknown (known: {', '.join(BIAS_EVALS)})")
    was_training = model.training
    scores: dict[str, float] = {}
    try:
        if any(e in LM_EVALS for e in evals):
            objective = task_objective(model, model_name_or_config)
            lm = with_lm_head(model, model_name_or_config, seed=seed)
            if "crows_pairs" in evals:
                scores |= crows_pairs(lm, tokenizer, objective, load_crows_pairs(data_dir, limit=limit, seed=seed),
                                      device=device, batch_size=batch_size)
            if "winobias" in evals:
                scores |= winobias(lm, tokenizer, objective, load_winobias(data_dir, limit=limit, seed=seed),
                                   device=device, batch_size=batch_size)
        if "bbq" in evals:
            questions = load_bbq(data_dir, limit=limit, seed=seed, unseen_by=trained_on)
            scores |= bbq(model, tokenizer, questions, device=device,
                          batch_size=batch_size, max_length=max_length)
    finally:
        model.train(was_training)
    return scores
