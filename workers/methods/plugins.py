"""Methods from other installed packages: each entry point of the group `peftlab.methods` names a
`Method` subclass, registered under the entry point's name; one that fails to load is kept as its reason."""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from .base import Method
from .registry import registered, register

GROUP = "peftlab.methods"
FAILED: dict[str, str] = {}
"""Entry-point name -> why that plugin method is not available (one line naming its package)."""


def _package(point: EntryPoint) -> str:
    return point.dist.name if point.dist is not None else point.value.split(":")[0].split(".")[0]


def _load(point: EntryPoint) -> None:
    loaded = point.load()
    if not (isinstance(loaded, type) and issubclass(loaded, Method)):
        raise TypeError(f"{point.value} is not a subclass of peftlab's Method")
    if getattr(loaded, "name", None) != point.name:
        raise ValueError(f"its class is named {getattr(loaded, 'name', None)!r}, not {point.name!r}")
    existing = registered(point.name)
    if existing is None:
        register(loaded)
    elif type(existing) is not loaded:  # registered by its own @register on import: that is this class
        raise ValueError(f"the name '{point.name}' is taken by {type(existing).__module__}.{type(existing).__name__}")


def load_plugins() -> None:
    """Register every plugin method; a broken one is recorded in FAILED and the others still load."""
    for point in entry_points(group=GROUP):
        try:
            _load(point)
        except Exception as exc:  # noqa: BLE001 - a third-party import may raise anything; the rest must stay usable
            FAILED[point.name] = (f"method '{point.name}' from package '{_package(point)}' (entry point "
                                  f"{GROUP}: {point.value}) failed to load: {type(exc).__name__}: {exc}")
