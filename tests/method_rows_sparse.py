"""Contract-table rows of the sparse methods chosen from the data (GPS, SPT) on every tiny shape; the
table calibrates them on training batches after apply, as a trial does."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from method_table import Case, head, in_any_head
from tiny_models import ALL_CONFIGS


def gps_count(k: int) -> Callable[[nn.Module], int]:
    """K input connections per output row, plus the layer's bias, over every linear layer outside the head."""
    def count(m: nn.Module) -> int:
        total = head(m)
        for name, module in m.named_modules():
            if in_any_head(name) or not isinstance(module, (nn.Linear, Conv1D)):
                continue
            d_out = module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]
            total += k * d_out + (module.bias.numel() if module.bias is not None else 0)
        return total
    return count


def gps_owns(n: str) -> bool:
    return in_any_head(n) or "sparse_values" in n or n.endswith(".base.bias")


def spt_owns(n: str) -> bool:
    return in_any_head(n) or "sparse_values" in n or "lora_A" in n or "lora_B" in n


EVERY_SHAPE = tuple(ALL_CONFIGS)
ROWS = [
    Case("gps", {"k": 2, "calibration_batches": 4}, gps_count(2), gps_owns, shapes=EVERY_SHAPE),
    Case("gps", {"k": 1, "loss": "ce", "calibration_batches": 2, "target_modules": ["query", "value"]},
         lambda m: head(m) + sum(32 + 32 for n, _ in m.named_modules() if n.endswith((".query", ".value"))),
         gps_owns, id="gps-ce-query-value", shapes=("bert",)),
    # A LoRA costs r (d_in + d_out) >= 48 here, never below the threshold: the budget stays sparse.
    Case("spt", {"params": 150, "r": 1, "lora_share": 1.0, "calibration_batches": 3},
         lambda m: head(m) + 150, spt_owns, shapes=EVERY_SHAPE),
]
