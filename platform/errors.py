"""User-facing errors: anything a user can cause ends in one `UserError`.

The CLI prints its message as one line and exits with code 2, before any work starts.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input (spec, data, model, address); message is one line."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(UserError):
    """One or more problems found while validating a spec, each naming its key path."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = problems
        super().__init__("; ".join(problems), where=source)
