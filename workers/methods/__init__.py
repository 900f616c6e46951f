"""PEFT methods behind one interface (`Method`) and one registry, looked up by name.
Importing this package registers every method module listed below."""
from .base import OPTIMIZER_HPARAMS, HParam, Method, TaskInfo
from .registry import all_methods, get_method, register

from . import selective, peft_lora, peft_ia3, peft_prompt  # noqa: E402,F401  (they register themselves)

__all__ = ["OPTIMIZER_HPARAMS", "HParam", "Method", "TaskInfo", "all_methods", "get_method", "register"]
