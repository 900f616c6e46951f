"""The method registry: every method module registers its class here by name.
The spec validator, the CLI and the trial look methods up by that name and nothing else."""
from __future__ import annotations

from peftlab.errors import UserError

from .base import Method

_METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance per method name; a second class with the same name is a bug."""
    if cls.name in _METHODS:
        first = type(_METHODS[cls.name]).__name__
        raise ValueError(f"method '{cls.name}' is registered twice ({first}, {cls.__name__})")
    _METHODS[cls.name] = cls()
    return cls


def registered(name: str) -> Method | None:
    return _METHODS.get(name)


def get_method(name: str) -> Method:
    from .plugins import FAILED

    if name in FAILED:
        raise UserError(FAILED[name])
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}'; known: {', '.join(sorted(_METHODS))}") from None


def all_methods() -> dict[str, Method]:
    return dict(sorted(_METHODS.items()))
