"""Causal-LM instruction tuning: prompt + response sequences with the loss on response tokens
only; loss, perplexity and optionally exact match of greedy answers out, and forgetting (the
change of loss on reference texts) as retention."""
from __future__ import annotations

import math
import string
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.spec import TaskSpec, TrainingSpec
from peftlab.workers.models import LoadOptions
from peftlab.workers.data import (DATASETS, InstructionData, TextClassificationData, load_instruction_data,
                                  load_text_classification, load_texts, split_options)
from peftlab.workers.tasks.base import Task, TaskKind

IGNORE = -100
"""Label of positions that carry no loss (the prompt and padding), as transformers' losses expect."""
DEFAULT_REFERENCE = "sst2"


class CausalLmSpec(TaskSpec):
    """Instruction tuning of a decoder: a prompt column and a response column."""

    type: Literal["causal-lm"] = "causal-lm"
    prompt_column: str = "prompt"
    """Column holding the instruction (no loss on its tokens)."""
    response_column: str = "response"
    """Column holding the answer the model learns to produce."""
    exact_match: bool = False
    """Also generate greedy answers for the evaluation prompts and report exact_match."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    """Tokens generated per answer for exact match."""
    reference: str | None = None
    """Texts (registry name or file; its `text_column`) whose loss before vs after tuning gives
    forgetting; defaults to sst2's validation sentences."""
    text_column: str = "text"
    """Column of `reference` holding its texts."""
    prompt_template: str = "{text}\nAnswer ({labels}):"
    """For a registry classification data set (sst2, banking77, fomc) as instructions: the prompt
    made of each example's {text} and the {labels} to choose from; the response is its label's name."""

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        # Only plain fields: a format string could otherwise reach attributes of the values.
        try:
            fields = [name for _, name, spec, conversion in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"not a template: {exc}") from None
        if "text" not in fields or any(f not in ("text", "labels") for f in fields):
            raise ValueError(f"use {{text}} (required) and {{labels}} only, got fields {fields}")
        return value


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; labels are IGNORE on the prompt and padding.

    The prompt is tokenized apart from the response, so its boundary is exact: the model sees
    `[bos] prompt response eos`, learns only `response eos`. Sequences longer than max_length lose
    their end.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows, labels = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + r)[:max_length])
        labels.append(([IGNORE] * len(p) + r)[:max_length])
    return _pad(rows, labels, tokenizer.pad_token_id)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Plain language-modelling sequences: every real token is a label."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length] for t in texts]
    return _pad(rows, [list(r) for r in rows], tokenizer.pad_token_id)


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
    }
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        out["input_ids"][i, :len(row)] = torch.tensor(row)
        out["attention_mask"][i, :len(row)] = 1
        out["labels"][i, :len(label)] = torch.tensor(label)
    return out


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    length = max(1, int(batch["attention_mask"].sum(-1).max()))
    return {k: v[:, :length] for k, v in batch.items()}


@torch.no_grad()
def token_loss(model: nn.Module, encoded: dict[str, torch.Tensor], batch_size: int,
               device: torch.device) -> tuple[float, int]:
    """(summed next-token cross-entropy over labelled positions, number of those positions)."""
    total, count = 0.0, 0
    n = len(encoded["input_ids"])
    for start in range(0, n, batch_size):
        batch = _trim({k: v[start:start + batch_size].to(device) for k, v in encoded.items()})
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:].float()  # prompt methods prepend positions
        shifted = labels[:, 1:]
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((shifted != IGNORE).sum())
    return total, count


@torch.no_grad()
def greedy_answers(model: nn.Module, tok, prompts: list[str], batch_size: int, max_new_tokens: int,
                   device: torch.device) -> list[str]:
    """Each prompt's greedy continuation of at most `max_new_tokens` tokens, decoded."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids_of = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in ids_of)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids_of], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids_of], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def as_instructions(data: TextClassificationData, template: str) -> InstructionData:
    """Each example's text in the prompt template, its label's name as the response."""
    labels = ", ".join(data.label_names)

    def pairs(texts: list[str], label_ids: list[int]) -> tuple[list[str], list[str]]:
        return ([template.format(text=t, labels=labels) for t in texts], [data.label_names[i] for i in label_ids])

    return InstructionData(*pairs(data.train_texts, data.train_labels),
                           *pairs(data.validation_texts, data.validation_labels),
                           *pairs(data.test_texts, data.test_labels), sizes=data.sizes)


class CausalLmTask(Task):
    """Instruction pairs; the loss is per response token, perplexity its exponential."""

    def __init__(self, data: InstructionData, tokenizer, max_length: int, *, exact_match: bool = False,
                 max_new_tokens: int = 32, reference_texts: list[str] | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.train = encode_pairs(tokenizer, data.train_prompts, data.train_responses, max_length)
        self.splits = {split: encode_pairs(tokenizer, getattr(data, f"{split}_prompts"),
                                           getattr(data, f"{split}_responses"), max_length)
                       for split in ("validation", "test")}
        self.pairs = {split: (getattr(data, f"{split}_prompts"), getattr(data, f"{split}_responses"))
                      for split in ("validation", "test")}
        self.exact_match, self.max_new_tokens = exact_match, max_new_tokens
        self.reference = encode_texts(tokenizer, reference_texts, max_length) if reference_texts else None
        self.base_reference_loss: float | None = None

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        n = len(self.train["input_ids"])
        size = min(batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):
                yield _trim({k: v[order[start:start + size]] for k, v in self.train.items()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 split: str = "validation") -> dict[str, float]:
        model.eval()
        total, count = token_loss(model, self.splits[split], batch_size, device)
        metrics = {"loss": total / max(count, 1)}
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))  # capped: exp overflows a float
        if self.exact_match:
            metrics["exact_match"] = self._exact_match(model, batch_size, device, split)
        model.train()
        return metrics

    def _exact_match(self, model: nn.Module, batch_size: int, device: torch.device, split: str) -> float:
        """Share of the split's prompts whose greedy answer equals the response (whitespace-stripped)."""
        prompts, responses = self.pairs[split]
        answers = greedy_answers(model, self.tokenizer, prompts, batch_size, self.max_new_tokens, device)
        return sum(a.strip() == g.strip() for a, g in zip(answers, responses, strict=True)) / len(prompts)

    def _reference_loss(self, model: nn.Module, device: torch.device) -> float:
        was_training = model.training
        model.eval()
        total, count = token_loss(model, self.reference, 32, device)
        model.train(was_training)
        return total / max(count, 1)

    def remember(self, model: nn.Module, device: torch.device) -> None:
        if self.reference is not None:
            self.base_reference_loss = self._reference_loss(model.to(device), device)

    def retention(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if self.base_reference_loss is None:
            return {}
        return {"forgetting": self._reference_loss(model, device) - self.base_reference_loss}


class CausalLmKind(TaskKind):
    name = "causal-lm"
    summary = "instruction tuning of a decoder: the response's tokens given the prompt; the pretrained LM head"
    spec_model = CausalLmSpec
    metrics = ("loss", "perplexity", "exact_match")
    offers = frozenset({"linear_layers", "blocks", "token_prompt"})
    peft_task_type = "CAUSAL_LM"
    default_model = None
    language_model = True

    def default_metric(self, spec: CausalLmSpec) -> str:
        return "exact_match" if spec.exact_match else "loss"

    def spec_problems(self, spec: CausalLmSpec, metric: str) -> list[str]:
        if metric == "exact_match" and not spec.exact_match:
            return ["validation/exact_match needs `exact_match: true`"]
        return []

    def registry_dataset(self, name: str):
        """A registry classification set read as instructions: its domain, scored by the answer's loss."""
        info = DATASETS.get(name)
        return None if info is None else replace(info, metric="loss")

    def load_data(self, spec: CausalLmSpec, data_dir: Path | None) -> InstructionData:
        if spec.dataset in DATASETS:
            data = load_text_classification(spec.dataset, options=split_options(spec), data_dir=data_dir)
            return as_instructions(data, spec.prompt_template)
        return load_instruction_data(
            spec.dataset, prompt_column=spec.prompt_column, response_column=spec.response_column,
            options=split_options(spec),
        )

    def load_model(self, model: str, data: InstructionData, data_dir: Path | None, options: LoadOptions = LoadOptions()):
        from peftlab.workers.models import load_causal_lm

        return load_causal_lm(model, options=options)

    def meta_model(self, model: str, data: InstructionData, data_dir: Path | None) -> nn.Module:
        from peftlab.workers.models import load_causal_lm

        return load_causal_lm(model, meta=True)[0]

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        return ()  # the LM head is the pretrained one (often tied to the embeddings): nothing new

    def prediction_inputs(self, spec: CausalLmSpec, path: Path) -> list[str]:
        from peftlab.workers.data import read_file_texts

        return read_file_texts(path, spec.prompt_column)

    def predict(self, model: nn.Module, processor, data: InstructionData, spec: CausalLmSpec, training: TrainingSpec,
                inputs: list[str]) -> list[dict]:
        """Each prompt's greedy answer (at most the task's `max_new_tokens`), in order."""
        model.eval()
        device = next(model.parameters()).device
        answers = greedy_answers(model, processor, inputs, training.eval_batch_size, spec.max_new_tokens, device)
        return [{"row": i + 1, spec.prompt_column: prompt, "prediction": answer}
                for i, (prompt, answer) in enumerate(zip(inputs, answers, strict=True))]

    def corpus(self, data: InstructionData) -> list[str]:
        return [f"{p} {r}" for p, r in zip(data.train_prompts, data.train_responses, strict=True)]

    def build_task(self, data: InstructionData, processor, head: tuple[str, ...], spec: CausalLmSpec,
                   training: TrainingSpec, data_dir: Path | None) -> CausalLmTask:
        reference = None
        if spec.retention:
            reference = load_texts(spec.reference or DEFAULT_REFERENCE, column=spec.text_column,
                                   limit=spec.retention_samples, data_dir=data_dir)
        return CausalLmTask(data, processor, training.max_length, exact_match=spec.exact_match,
                            max_new_tokens=spec.max_new_tokens, reference_texts=reference)
