"""Prompt tuning through peft's PromptTuningConfig: p trained soft tokens before the input embeddings.
peft extends attention_mask and token_type_ids for them; the model's weights are untouched."""
from __future__ import annotations

from peft import PromptTuningConfig, PromptTuningInit
from torch import nn

from .base import HParam, TaskInfo
from .peft_backed import PeftMethod, peft_task_type
from .registry import register


@register
class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    summary = "soft prompt tokens prepended to the input embeddings, and the head"
    paper = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv 2104.08691"
    formula = "num_virtual_tokens*d_model + head"
    mergeable = False
    identity_at_init = False  # the extra tokens change every output from the first step
    default_lr = 3e-2
    needs = frozenset({"token_prompt"})
    hparams = (
        HParam("num_virtual_tokens", int, 20, "number of soft tokens prepended", low=1, size=True),
        HParam(
            "init", str, "random",
            "random: N(0, 1) entries (peft's default); text: the embeddings of init_text's tokens (special tokens "
            "included, as peft tokenizes it), repeated to length",
            choices=("random", "text"),
        ),
        HParam("init_text", str, "", "text whose token embeddings start the prompt (init: text)"),
        HParam("tokenizer", str, None, "tokenizer for init_text; default: the model's name_or_path"),
    )

    def _tokenizer(self, model: nn.Module, hp: dict) -> str | None:
        return hp["tokenizer"] or getattr(model, "name_or_path", None) or None

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> PromptTuningConfig:
        text = hp["init"] == "text"
        return PromptTuningConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=hp["num_virtual_tokens"],
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=hp["init_text"] if text else None,
            tokenizer_name_or_path=self._tokenizer(model, hp) if text else None,
            modules_to_save=list(task.head_modules),
        )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problems = []
        if hp["init"] == "text" and not hp["init_text"]:
            problems.append("init 'text' needs a non-empty init_text")
        if hp["init"] == "text" and not self._tokenizer(model, hp):
            problems.append("init 'text' needs a tokenizer (the model has no name_or_path)")
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_positions is not None and hp["num_virtual_tokens"] >= max_positions:
            problems.append(
                f"num_virtual_tokens {hp['num_virtual_tokens']} leaves no room for input: the model has "
                f"{max_positions} positions"
            )
        return problems

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        # SEQ_CLS has one transformer submodule, so one p x d_model prompt table.
        return hp["num_virtual_tokens"] * model.get_input_embeddings().embedding_dim
