"""VPT (Visual Prompt Tuning): p trained prompt tokens in a ViT's patch-token sequence, right after CLS.

Shallow: the tokens are inserted once, after the embeddings (CLS, position embeddings and their
dropout), so every layer sees 1 + p + N tokens. Deep: each later layer gets its own p tokens in
place of the p prompt positions the layer before it produced. The prompts hang on existing modules
(the embeddings and each encoder layer) and enter through forward hooks, so no frozen tensor is
renamed or copied and the classifier still reads the CLS token at position 0."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from peftlab.workers.architectures import architecture, blocks, describe

from .base import HParam, Method, TaskInfo, in_head
from .registry import register

PROMPT = "vpt_prompt"
"""The child name the prompt module gets on the embeddings (shallow) and on each later layer (deep)."""


class Prompt(nn.Module):
    """p prompt tokens of width d (`tokens`, p x d) and the dropout applied to them on every use."""

    def __init__(self, p: int, d: int, bound: float, dropout: float, like: torch.Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(p, d, device=like.device, dtype=like.dtype))
        self.dropout = dropout
        with torch.no_grad():
            nn.init.uniform_(self.tokens, -bound, bound)

    def expanded(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """batch x p x d, in the dtype of the stream they join."""
        tokens = F.dropout(self.tokens, self.dropout, self.training)
        return tokens.to(like.dtype).unsqueeze(0).expand(batch, -1, -1)


def _insert_after_cls(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the embeddings: [CLS, patches] -> [CLS, prompts, patches]."""
    prompt: Prompt = getattr(module, PROMPT)
    return torch.cat((output[:, :1], prompt.expanded(output.shape[0], output), output[:, 1:]), dim=1)


def _replace_prompts(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on a later encoder layer: its input's p prompt positions become its own prompts."""
    prompt: Prompt = getattr(module, PROMPT)
    hidden = args[0] if args else kwargs["hidden_states"]
    p = prompt.tokens.shape[0]
    hidden = torch.cat((hidden[:, :1], prompt.expanded(hidden.shape[0], hidden), hidden[:, 1 + p:]), dim=1)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _embeddings(model: nn.Module, task: TaskInfo) -> nn.Module | None:
    """The module that builds [CLS, patches] (a CLS token and a patch embedding), outside the head."""
    return next((m for n, m in model.named_modules()
                 if not in_head(n, task) and hasattr(m, "cls_token") and hasattr(m, "patch_embeddings")), None)


def _fan_in(embeddings: nn.Module) -> int:
    """Inputs to one patch token: channels x patch height x patch width (the patch projection's fan-in)."""
    return int(math.prod(embeddings.patch_embeddings.projection.weight.shape[1:]))


@register
class VPT(Method):
    """Visual Prompt Tuning (Jia et al. 2022; reference code KMnP/vpt, src/models/vit_prompt/vit.py).

    Shallow: p tokens inserted after CLS at the input, p*d parameters. Deep: those plus p tokens for each
    of layers 2..L, which replace the previous layer's outputs at the prompt positions, L*p*d parameters.
    Every prompt starts uniform in +-sqrt(6 / (C*P*P + d)) (Xavier-uniform with the patch projection's
    fan-in; the reference writes C = 3) and passes through its own dropout (default 0) each time it is
    used. Everything else is frozen but the head, which reads the CLS token as before.

    Not the identity at init: the extra tokens take part in every layer's attention, so the CLS token
    (and hence the logits) changes from the first forward, whatever the prompts' values.

    Differs from the reference in two details: the optimizer is peftlab's AdamW, not SGD with momentum
    (so its learning rate is not the reference's 0.1-50 grid); and the frozen backbone follows the
    model's train/eval mode, where the reference keeps it in eval mode while training (no difference with
    Hugging Face ViT's default dropout of 0). Its ablations (prompt projection, partial-deep, shared deep
    prompts, other init schemes) are not offered.
    """

    name = "vpt"
    summary = "prompt tokens after a ViT's CLS token, at the input (shallow) or at every layer (deep), and the head"
    paper = "Jia et al. 2022, Visual Prompt Tuning, arXiv 2203.12119"
    formula = "num_tokens*d (shallow) or L*num_tokens*d (deep) + head"
    mergeable = False
    identity_at_init = False  # the prompts join every layer's attention, so the CLS token changes at step 0
    default_lr = 1e-2
    needs = frozenset({"patch_tokens"})
    hparams = (
        HParam("num_tokens", int, 5, "p, prompt tokens per layer (the reference's NUM_TOKENS, default 5)",
               low=1, high=4096, size=True),
        HParam("deep", bool, False, "false: prompts at the input only (shallow); true: own prompts at every layer "
               "(deep)"),
        HParam("dropout", float, 0.0, "dropout on the prompt tokens (the reference's DROPOUT, default 0)",
               low=0.0, high=0.99),
    )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        found = architecture(model)
        if found is None or found.name != "vit" or _embeddings(model, task) is None:
            return [(f"method {self.name} inserts prompt tokens after the CLS token of a ViT (model type 'vit'), "
                     f"and {describe(model)} has no such patch-token sequence; methods that take target_modules "
                     f"(lora, dora, ...) work on any model")]
        if not blocks(model, task.head_modules):
            return [f"method {self.name} found no encoder layers in {describe(model)}"]
        return []

    def _apply(self, model: nn.Module, hp: dict, task: TaskInfo) -> nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(in_head(name, task))
        embeddings = _embeddings(model, task)
        d = int(embeddings.cls_token.shape[-1])
        bound = math.sqrt(6.0 / (_fan_in(embeddings) + d))

        def prompt() -> Prompt:
            return Prompt(hp["num_tokens"], d, bound, hp["dropout"], embeddings.cls_token)

        embeddings.add_module(PROMPT, prompt())
        embeddings.register_forward_hook(_insert_after_cls)
        if hp["deep"]:
            for _, layer in blocks(model, task.head_modules)[1:]:
                layer.add_module(PROMPT, prompt())
                layer.register_forward_pre_hook(_replace_prompts, with_kwargs=True)
        return model

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        d = int(_embeddings(model, task).cls_token.shape[-1])
        layers = len(blocks(model, task.head_modules)) if hp["deep"] else 1
        return layers * hp["num_tokens"] * d
