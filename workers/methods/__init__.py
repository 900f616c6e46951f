"""PEFT methods behind one interface (`Method`) and one registry, looked up by name.
Importing this package imports every module in it, each registering its methods, then the
plugin methods other installed packages declare."""
import importlib
import pkgutil

from .base import OPTIMIZER_HPARAMS, Calibration, HParam, Method, TaskInfo
from .plugins import FAILED as FAILED_PLUGINS
from .plugins import load_plugins
from .registry import all_methods, get_method, register

# A new method is one new module here: no list to keep in sync.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
# Then other packages' methods (entry points `peftlab.methods`), which cannot replace these.
load_plugins()

__all__ = ["Calibration", "FAILED_PLUGINS", "OPTIMIZER_HPARAMS", "HParam", "Method", "TaskInfo", "all_methods", "get_method", "register"]
