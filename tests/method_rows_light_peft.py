"""Contract-table rows of Light-PEFT before its pruning: a LoRA on the targets plus one mask per attention head
(per key/value group under grouped-query attention) and per FFN neuron of every block, on every tiny shape."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from method_table import Case, head, in_any_head, linears

# Per architecture: the modules whose inputs the head masks and the neuron masks scale.
MASKED = {"bert": ("attention.output.dense", "output.dense"), "roberta": ("attention.output.dense", "output.dense"),
          "vit": ("attention.o_proj", "mlp.fc2"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
          "llama": ("self_attn.o_proj", "mlp.down_proj")}


def masks(m: nn.Module) -> int:
    """Key/value heads (all heads without grouped-query attention) plus FFN neurons, per block."""
    config = m.config
    groups = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    _, down = MASKED[config.model_type]
    # A block's FFN neurons are the inputs of its down projection.
    neurons = [d.in_features for d in linears(m, lambda n: n.endswith("." + down) and ".attention." not in n)]
    return len(neurons) * groups + sum(neurons)


def count(r: int, keep: Callable[[str], bool]) -> Callable[[nn.Module], int]:
    return lambda m: head(m) + masks(m) + sum(r * (d.in_features + d.out_features) for d in linears(m, keep))


def query_value(name: str) -> bool:
    return name.endswith((".query", ".value", ".q_proj", ".v_proj", ".c_attn"))


def owns(name: str) -> bool:
    return in_any_head(name) or ".lora_" in name or name.endswith(".light_peft_mask")


EVERY_SHAPE = ("bert", "roberta", "vit", "gpt2", "llama")
ROWS = [
    Case("light_peft", {"r": 4}, count(4, query_value), owns, shapes=EVERY_SHAPE),
    # Every linear layer: the masks then scale the inputs of LoRA-wrapped layers.
    Case("light_peft", {"r": 2, "target_modules": "all-linear"}, count(2, lambda n: True), owns,
         id="light_peft-all-linear", shapes=("bert", "gpt2", "llama")),
]
