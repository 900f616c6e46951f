"""PEFTDebias (Agarwal et al. 2023): a first LoRA trained on a counterfactually augmented corpus with
the model's pre-training objective, frozen, then a second LoRA trained on the task beside it.

Stage 1 runs in `calibrate` (before the loop): the task's training texts that hold a gender or race
word, each with its word-swapped twin (workers/counterfactual.py), under masked-LM (encoders) or
next-token (decoders) loss through the model's own language-modelling head. A checkpoint without
trained LM head weights (MiniLM, a sentence encoder) gets a fresh head from its config, trained with
the first LoRA in stage 1 and dropped after it. Stage 2 is the loop: only the task LoRA and the head
train. Both LoRAs are saved with the adapter and merge into W.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.workers.counterfactual import AXES, augment

from .base import Calibration, HParam, TaskInfo
from .registry import register
from .spectral import RankedWrapping, rank_problems
from .wrapped import TARGET_MODULES, AdaptedLinear, lora_factors

MASK_PROBABILITY = 0.15
"""BERT's masking: 15% of the tokens, of which 80% become [MASK], 10% a random token, 10% stay."""


class DebiasLinear(AdaptedLinear):
    """y = W x + b + s_d B_d A_d x + s B A dropout(x): the debiasing LoRA (stage 1, then frozen) and
    the task LoRA (stage 2); both B start at zero."""

    def __init__(self, base: nn.Linear, hp: dict) -> None:
        super().__init__(base, hp)
        W = base.weight
        self.debias_A, self.debias_B = lora_factors(W, hp["debias_r"], trainable=False)
        self.task_A, self.task_B = lora_factors(W, hp["r"])
        self.debias_scaling, self.scaling = hp["alpha"] / hp["debias_r"], hp["alpha"] / hp["r"]
        self.dropout = nn.Dropout(hp["dropout"]) if hp["dropout"] > 0 else nn.Identity()

    def adapted_weight(self) -> torch.Tensor:
        return (self.base.weight + self.debias_scaling * self.debias_B @ self.debias_A
                + self.scaling * self.task_B @ self.task_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.base(x) + self.debias_scaling * (x @ self.debias_A.T) @ self.debias_B.T
                + self.scaling * (self.dropout(x) @ self.task_A.T) @ self.task_B.T)

    @staticmethod
    def count(d_in: int, d_out: int, hp: dict) -> int:
        return hp["r"] * (d_in + d_out)


def mask_tokens(tokenizer, input_ids: torch.Tensor, special: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of a batch: (inputs, labels), labels -100 except where masked;
    at least one token is masked so the loss is defined."""
    labels = input_ids.clone()
    candidates = ~special.bool()
    chosen = (torch.rand(input_ids.shape, generator=generator) < MASK_PROBABILITY) & candidates
    if not chosen.any():
        chosen[tuple(candidates.nonzero()[0])] = True
    labels[~chosen] = -100
    inputs = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    noise = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[noise] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[noise]
    return inputs, labels


def lm_batch(tokenizer, texts: list[str], objective: str, max_length: int, generator: torch.Generator
             ) -> dict[str, torch.Tensor]:
    """The model inputs and labels of one pre-training batch."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        return_special_tokens_mask=True)
    special = encoded.pop("special_tokens_mask")
    if objective == "mlm":
        encoded["input_ids"], encoded["labels"] = mask_tokens(tokenizer, encoded["input_ids"], special, generator)
    else:
        encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    if objective == "clm":
        encoded.pop("token_type_ids", None)  # decoders take none
    return dict(encoded)


@register
class PeftDebias(RankedWrapping):
    name = "peft_debias"
    summary = ("a LoRA trained first on the task's texts with their gender/race-swapped twins under the model's "
               "pre-training objective, then frozen; a second LoRA and the head trained on the task")
    paper = "Agarwal et al. 2023, PEFTDebias: Capturing debiasing information using PEFTs, EMNLP 2023"
    formula = "r*(d_in+d_out) per target layer + head (the frozen first stage adds debias_r*(d_in+d_out), not trained in stage 2)"
    identity_at_init = True
    default_lr = 5e-4
    layer = DebiasLinear
    saved_frozen = ("debias_A", "debias_B")
    hparams = (
        HParam("r", int, 8, "rank of the task LoRA (stage 2)", low=1, size=True),
        HParam("alpha", float, 16, "both LoRAs scaled by alpha/rank", low=0.0, open_low=True),
        HParam("dropout", float, 0.05, "dropout on the task LoRA's input", low=0.0, high=1.0),
        HParam("debias_r", int, 8, "rank of the debiasing LoRA (stage 1)", low=1),
        HParam("debias_steps", int, 200, "optimizer steps of stage 1", low=1, high=1_000_000),
        HParam("debias_lr", float, 1e-3, "AdamW learning rate of stage 1", low=0.0, open_low=True),
        HParam("debias_batch_size", int, 16, "texts per stage-1 step", low=1, high=4096),
        HParam("axes", list, ["gender"], f"attribute words swapped to build the corpus: {', '.join(AXES)}"),
        TARGET_MODULES,
    )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        from peftlab.workers.lm_head import objective_for_config

        problems = super()._problems(model, hp, task)
        if not problems:
            problems += [p.replace(f"r={hp['debias_r']}", f"debias_r={hp['debias_r']}", 1)
                         for p in rank_problems(model, {**hp, "r": hp["debias_r"]}, task)]
        if unknown := [a for a in hp["axes"] if a not in AXES]:
            problems.append(f"axes: {unknown} unknown; use some of {', '.join(AXES)}")
        config = getattr(model, "config", None)
        if config is None or objective_for_config(config) is None:
            kind = f" ({config.model_type})" if config is not None else ""
            problems.append(f"peft_debias trains its first stage with the model's pre-training objective (masked LM "
                            f"for encoders, next token for decoders); {type(model).__name__}{kind} has neither")
        return problems

    def data_problems(self, hparams: dict, texts: list[str]) -> list[str]:
        if not augment(texts, hparams["axes"]):
            return [f"none of the task's {len(texts):,} training texts holds a {'/'.join(hparams['axes'])} word to "
                    "swap, so the counterfactual corpus of stage 1 is empty; add axes or use another task"]
        return []

    @staticmethod
    def _language_model(model: nn.Module, source, seed: int) -> tuple[nn.Module, bool]:
        """The model's LM over its backbone, and whether its head is fresh (to be trained in stage 1)."""
        from peftlab.workers.lm_head import is_causal_lm, lm_objective, with_lm_head
        from peftlab.workers.models import load_config

        if is_causal_lm(model) or not isinstance(source, str):
            return with_lm_head(model, source, seed=seed), not is_causal_lm(model)
        objective, _ = lm_objective(source)
        if objective is None:  # the architecture has an LM head, this checkpoint trained none
            return with_lm_head(model, load_config(source, None), seed=seed), True
        return with_lm_head(model, source), False

    def calibrate(self, model: nn.Module, calibration: Calibration) -> dict[str, float]:
        from peftlab.workers.lm_head import is_causal_lm, objective_for_config

        hp = model.peftlab_applied.hparams
        corpus = augment(calibration.texts, hp["axes"])
        if not corpus:
            raise UserError(self.data_problems(hp, calibration.texts)[0], where=f"method {self.name}")
        lm, fresh = self._language_model(model, calibration.model_name, calibration.seed)
        objective = "clm" if is_causal_lm(lm) else objective_for_config(lm.config)
        tokenizer = calibration.processor
        if tokenizer is None or (objective == "mlm" and getattr(tokenizer, "mask_token_id", None) is None):
            raise UserError("peft_debias needs the task's tokenizer (with a mask token for a masked LM) for its "
                            "first stage", where=f"method {self.name}")
        lm.to(calibration.device)
        own = {id(p) for p in model.parameters()}
        head = [p for p in lm.parameters() if id(p) not in own]
        stage_one = [p for n, p in model.named_parameters() if n.endswith(self.saved_frozen)]
        stage_one += head if fresh else []
        stage_two = [p for p in model.parameters() if p.requires_grad]
        for p in head:  # a pretrained head stays as it is; a fresh one trains below
            p.requires_grad_(False)
        for p in stage_two:
            p.requires_grad_(False)
        for p in stage_one:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(stage_one, lr=hp["debias_lr"])
        generator = torch.Generator().manual_seed(calibration.seed)
        losses: list[float] = []
        was_training = model.training
        lm.train()
        try:
            for _ in range(hp["debias_steps"]):
                rows = torch.randint(len(corpus), (hp["debias_batch_size"],), generator=generator).tolist()
                batch = lm_batch(tokenizer, [corpus[i] for i in rows], objective,
                                 calibration.max_length, generator)
                loss = lm(**{k: v.to(calibration.device) for k, v in batch.items()}).loss
                if not math.isfinite(loss.item()):
                    raise UserError(f"stage 1 loss became {loss.item()}; lower debias_lr", where=f"method {self.name}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(stage_one, 1.0)
                optimizer.step()
                losses.append(loss.item())
        finally:
            for p in stage_one:
                p.requires_grad_(False)
                p.grad = None
            for p in stage_two:
                p.requires_grad_(True)
            model.train(was_training)
        window = max(1, min(10, len(losses) // 2))
        return {"calibration/corpus_texts": float(len(corpus)), "calibration/fresh_lm_head": float(fresh),
                "calibration/stage1_loss_first": sum(losses[:window]) / window,
                "calibration/stage1_loss_last": sum(losses[-window:]) / window}
