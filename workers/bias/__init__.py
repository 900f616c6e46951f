"""Bias evaluations of any trained model: CrowS-Pairs and WinoBias through its LM head, BBQ through
its multiple-choice answers; `bias_scores` is what a trial calls, `bias_problems` what validation asks."""
from __future__ import annotations

from .data import BbqSet, CrowsPair, WinoPair, load_bbq, load_crows_pairs, load_winobias
from .scores import (BIAS_EVALS, LM_EVALS, bbq, bbq_bias, bias_problems, bias_scores, crows_log_likelihoods,
                     crows_pairs, stereotype_scores, winobias, winobias_scores)

__all__ = ["BIAS_EVALS", "LM_EVALS", "BbqSet", "CrowsPair", "WinoPair", "bbq", "bbq_bias", "bias_problems",
           "bias_scores", "crows_log_likelihoods", "crows_pairs", "load_bbq", "load_crows_pairs", "load_winobias",
           "stereotype_scores", "winobias", "winobias_scores"]
