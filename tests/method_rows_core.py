"""Contract-table rows for the foundation's methods: full, linear_probe, bitfit and the peft-backed
LoRA, DoRA, (IA)^3 and prompt tuning, with hand-written parameter formulas."""
from __future__ import annotations

from typing import Callable

from peft import IA3Config, LoraConfig, PromptTuningConfig
from torch import nn

from method_table import Case, head, linears, peft_owned

# -- hand-written formulas, independent of the methods' own counting -----------------------------


def lora_count(r: int, names: tuple[str, ...] | None, dora: bool = False) -> Callable[[nn.Module], int]:
    """r (d_in + d_out) (+ d_out for DoRA's magnitude) per target; names None means all linear layers."""
    keep = (lambda n: True) if names is None else (lambda n: n.rsplit(".", 1)[-1] in names)
    return lambda m: head(m) + sum(
        r * (layer.in_features + layer.out_features) + dora * layer.out_features for layer in linears(m, keep)
    )


def ia3_count(model: nn.Module) -> int:
    """peft's bert/roberta default: key and value scaled on their output (d_out); every layer whose name
    ends in "output.dense" (the FFN down projection AND attention.output.dense) on its input (d_in)."""
    out = sum(l.out_features for l in linears(model, lambda n: n.endswith((".key", ".value"))))
    return head(model) + out + sum(l.in_features for l in linears(model, lambda n: n.endswith("output.dense")))


ROWS = [
    Case("full", {}, lambda m: sum(p.numel() for p in m.parameters()), lambda n: True),
    Case("linear_probe", {}, head, lambda n: n.startswith("classifier.")),
    Case(
        "bitfit", {},
        lambda m: head(m) + sum(
            p.numel() for n, p in m.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")
        ),
        lambda n: n.endswith(".bias") or n.startswith("classifier."),
    ),
    Case(
        "lora", {"r": 4, "alpha": 8, "dropout": 0.0}, lora_count(4, ("query", "value")), peft_owned("lora_"),
        lambda: LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]
        ),
    ),
    Case(
        "lora", {"r": 3, "target_modules": "all-linear", "use_rslora": True, "init": "gaussian"},
        lora_count(3, None), peft_owned("lora_"),
        lambda: LoraConfig(task_type="SEQ_CLS", r=3, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                           use_rslora=True, init_lora_weights="gaussian"),
        id="lora-all-linear",
    ),
    Case(
        "lora", {"r": 2, "init": "pissa", "dropout": 0.0, "target_modules": ["key", "dense"]},
        lora_count(2, ("key", "dense")), peft_owned("lora_"),
        lambda: LoraConfig(
            task_type="SEQ_CLS", r=2, lora_alpha=16, lora_dropout=0.0, target_modules=["key", "dense"],
            init_lora_weights="pissa",
        ),
        id="lora-pissa",
    ),
    Case(
        "dora", {"r": 4}, lora_count(4, ("query", "value"), dora=True), peft_owned("lora_"),
        lambda: LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
            use_dora=True,
        ),
    ),
    Case("ia3", {}, ia3_count, peft_owned("ia3_l"), lambda: IA3Config(task_type="SEQ_CLS")),
    Case(
        "prompt_tuning", {"num_virtual_tokens": 4},
        lambda m: head(m) + 4 * m.config.hidden_size, peft_owned("prompt_encoder."),
        lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    ),
]
