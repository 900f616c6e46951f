"""Contract-table rows for VPT on the tiny ViT (hidden d = 32, L = 2 layers, 4 patches and CLS): p prompt
tokens of width d at the input (shallow, p*d) or at each of the L layers (deep, L*p*d), plus the head."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from method_table import Case, head, in_any_head


def prompts(p: int, deep: bool) -> Callable[[nn.Module], int]:
    def count(m: nn.Module) -> int:
        d, layers = m.config.hidden_size, m.config.num_hidden_layers
        return head(m) + (layers if deep else 1) * p * d
    return count


def owns(n: str) -> bool:
    return in_any_head(n) or ".vpt_prompt." in n


ROWS = [
    Case("vpt", {"num_tokens": 3}, prompts(3, deep=False), owns, id="vpt-shallow", shapes=("vit",)),
    Case("vpt", {"num_tokens": 2, "deep": True, "dropout": 0.1}, prompts(2, deep=True), owns, id="vpt-deep",
         shapes=("vit",)),
]
