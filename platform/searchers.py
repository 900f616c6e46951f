"""A wrapper that lets a Ray Tune search algorithm see evaluations only: trials also report
progress (train loss, throughput) between evaluations, and those results hold no metric."""
from __future__ import annotations

from ray.tune.search import Searcher


class EvaluationsOnly(Searcher):
    """Passes the wrapped searcher only the results that hold its metric and, when a trial ends,
    that trial's last evaluation."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.last: dict[str, dict] = {}
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.searcher.metric in result:
            self.last[trial_id] = result
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and self.searcher.metric not in result:
            result = self.last.get(trial_id)
        self.last.pop(trial_id, None)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
