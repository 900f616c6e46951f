"""Which registered method applies to which task type on which architecture: each method's own
applicability check run on meta-device models (shapes, no weights) built from small configs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Column:
    task_type: str
    architecture: str
    build: Callable[[], nn.Module]
    head: tuple[str, ...]
    num_labels: int

    @property
    def label(self) -> str:
        return f"{self.task_type} ({self.architecture})"


def _meta(auto: str, config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        with torch.device("meta"):
            return getattr(transformers, auto).from_config(config)
    return build


def _resnet() -> nn.Module:
    from peftlab.workers.models import LogitsClassifier
    from peftlab.workers.vision.resnet_cifar import ResNetCifar

    with torch.device("meta"):
        return LogitsClassifier(ResNetCifar(20, 2))


def columns() -> list[Column]:
    from transformers import BertConfig, GPT2Config, LlamaConfig, ViTConfig

    # Wide enough that every method's default sizes fit (block sizes of 64 divide every layer).
    small = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return [
        Column("text-classification", "BERT", _meta("AutoModelForSequenceClassification",
                                                    BertConfig(**small, num_labels=2)), ("classifier",), 2),
        Column("image-classification", "ViT", _meta("AutoModelForImageClassification",
                                                    ViTConfig(**small, image_size=32, patch_size=8, num_labels=2)),
               ("classifier",), 2),
        Column("image-classification", "CIFAR ResNet", _resnet, ("net.linear",), 2),
        Column("causal-lm", "GPT-2", _meta("AutoModelForCausalLM", GPT2Config(n_embd=256, n_layer=2, n_head=4)), (), 0),
        Column("causal-lm", "Llama", _meta("AutoModelForCausalLM", LlamaConfig(**small, num_key_value_heads=2)), (), 0),
        Column("multiple-choice", "BERT", _meta("AutoModelForMultipleChoice", BertConfig(**small)), ("classifier",), 3),
    ]


def matrix() -> tuple[list[Column], dict[str, dict[str, list[str]]]]:
    """Per method, per column label: the reasons it does not apply with its defaults (empty: it does)."""
    from peftlab.workers.methods import TaskInfo, all_methods

    found = columns()
    models = {c.label: c.build() for c in found}
    cells: dict[str, dict[str, list[str]]] = {}
    for name, method in all_methods().items():
        cells[name] = {}
        for column in found:
            task = TaskInfo(column.task_type, column.num_labels, column.head)
            cells[name][column.label] = method.check_applicable(models[column.label], {}, task)
    return found, cells


def general(reason: str, method: str) -> str:
    """A refusal with the method's own name taken out, so methods refused alike share one note."""
    return reason.replace(f"method {method} ", "").replace(f"{method} adapts", "the method adapts")
