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
    from transformers import get_linear_schedule_with_warmup

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(settings.warmup_ratio * settings.max_steps), settings.max_steps
    )
    batches = task.train_batches(settings.batch_size, seed)

    train_seconds, examples, loss_sum, loss_count = 0.0, 0, 0.0, 0
    result: dict = {}
    for step in range(1, settings.max_steps + 1):
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        # .item() is a device sync point, but the finiteness check needs it every step.
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"training loss became {loss_value} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        after_step(step)
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        examples += len(batch["labels"])
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1

        last = step == settings.max_steps
        if step % settings.eval_every and not last:
            continue
        metrics = task.evaluate(model, settings.eval_batch_size, device)
        result = {
            "step": step,
            "train/loss": loss_sum / loss_count,
            **{f"eval/{k}": v for k, v in metrics.items()},
            "train_seconds": train_seconds,
            "samples_per_second": examples / train_seconds if train_seconds else 0.0,
            "peak_memory_bytes": peak_memory_bytes(device),
            "lr": scheduler.get_last_lr()[0],
        }
        loss_sum, loss_count = 0.0, 0
        if last:
            result.update(on_last_step())
        report(result)
    return result
