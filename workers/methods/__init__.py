"""PEFT methods behind one interface (`Method`) and one registry, looked up by name.
Importing this package imports every module in it, and each module registers its methods."""
import importlib
import pkgutil

from .base import OPTIMIZER_HPARAMS, HParam, Method, TaskInfo
from .registry import all_methods, get_method, register

# A new method is one new module here: no list to keep in sync.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OPTIMIZER_HPARAMS", "HParam", "Method", "TaskInfo", "all_methods", "get_method", "register"]
