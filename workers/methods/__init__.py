"""PEFT methods behind one interface (`Method`) and one registry, looked up by name.
Importing this package registers every method module imported below."""
from . import peft_ia3, peft_lora, peft_prompt, selective  # noqa: F401  (each registers its methods)
from .base import OPTIMIZER_HPARAMS, HParam, Method, TaskInfo
from .registry import all_methods, get_method, register

__all__ = ["OPTIMIZER_HPARAMS", "HParam", "Method", "TaskInfo", "all_methods", "get_method", "register"]
