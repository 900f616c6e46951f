"""The training loop: AdamW, linear warmup and decay, clipping, periodic evaluation, accounting.

It names no PEFT method: the method has already frozen and injected what it needs, and the
loop trains whatever requires a gradient. Read it top to bottom.
"""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the trial is stopped and recorded as failed."""


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    batch_size: int
    eval_batch_size: int
    eval_every: int
    warmup_ratio: float
    max_grad_norm: float
    lr: float
    weight_decay: float


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak allocated by torch. CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def optimizer_and_schedule(params: list[nn.Parameter], settings: LoopSettings):
    """AdamW over `params`, with linear warmup then linear decay to zero at max_steps."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(settings.warmup_ratio * settings.max_steps), settings.max_steps
    )
    return optimizer, scheduler


def check_finite(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"training loss became {loss_value} at step {step}")


def is_eval_step(step: int, settings: LoopSettings) -> bool:
    return step % settings.eval_every == 0 or step == settings.max_steps


@dataclass
class Meter:
    """Optimizer-step time and examples so far, train loss since the last report."""

    device: torch.device
    train_seconds: float = 0.0
    examples: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    def add(self, seconds: float, examples: int, loss_value: float) -> None:
        self.train_seconds += seconds
        self.examples += examples
        self.loss_sum, self.loss_count = self.loss_sum + loss_value, self.loss_count + 1

    def report(self, step: int, metrics: dict[str, float], lr: float) -> dict:
        """One evaluation's report; the train loss restarts from here."""
        result = {
            "step": step,
            "train/loss": self.loss_sum / self.loss_count,
            **{f"eval/{k}": v for k, v in metrics.items()},
            "train_seconds": self.train_seconds,
            "samples_per_second": self.examples / self.train_seconds if self.train_seconds else 0.0,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "lr": lr,
        }
        self.loss_sum, self.loss_count = 0.0, 0
        return result


def train(
    model: nn.Module,
    task,
    settings: LoopSettings,
    *,
    seed: int,
    device: torch.device,
    report: Callable[[dict], None],
    after_step: Callable[[int], None] = lambda step: None,
    on_last_step: Callable[[], dict] = dict,
) -> dict:
    """Train for `settings.max_steps`, calling `report` after each evaluation.

    Every report carries the step, train loss (mean since the last report), eval metrics and
    the costs so far. `after_step` runs after each optimizer step while gradients still exist
    (the method's own hook). `on_last_step` runs after the final evaluation (saving the
    adapter) and its dict joins the final report. Returns that final report.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, settings)
    batches = task.train_batches(settings.batch_size, seed)

    meter = Meter(device)
    result: dict = {}
    for step in range(1, settings.max_steps + 1):
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        # .item() is a device sync point, but the finiteness check needs it every step.
        loss_value = loss.item()
        check_finite(loss_value, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        after_step(step)
        optimizer.zero_grad(set_to_none=True)
        meter.add(time.perf_counter() - started, len(batch["labels"]), loss_value)

        if not is_eval_step(step, settings):
            continue
        metrics = task.evaluate(model, settings.eval_batch_size, device)
        result = meter.report(step, metrics, scheduler.get_last_lr()[0])
        if step == settings.max_steps:
            result.update(on_last_step())
        report(result)
    return result
