"""The one training loop of every trial: micro-batches, precision, clipping, finiteness, progress,
evaluation, save and report, whether the trial is one process or a DeepSpeed worker.

It names no PEFT method and no engine: the method has frozen and injected what it needs, and a
`Stepper` (one process here, DeepSpeed in distributed.py) owns backward, optimizer and schedule.
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from peftlab.workers import checkpoint
from peftlab.workers.report import Costs, Outcome, TrialReport

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    log_every: int = 10
    precision: str = "fp32"
    accumulation: int = 1
    select: str = "best"
    """"best": keep the state of the best validation evaluation; "last": the final one."""
    metric: str = "loss"
    """The validation metric (no prefix) that `select` and the rungs compare."""
    mode: str = "min"


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak allocated by torch. CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once; a 4-bit weight packs
    two values per stored element and is counted by its values."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def optimizer_and_schedule(params: list[nn.Parameter], settings: LoopSettings, done: int = 0):
    """AdamW over `params`, with linear warmup then linear decay to zero at max_steps; `done`: the
    steps the schedule has already taken (an optimizer made anew mid-run keeps the schedule's place)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.lr
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(settings.warmup_ratio * settings.max_steps), settings.max_steps, last_epoch=done - 1
    )
    return optimizer, scheduler


def check_finite(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"training loss became {loss_value} at step {step}")


def better(new: float | None, old: float | None, mode: str) -> bool:
    """Whether `new` beats `old` in direction `mode`; a missing or non-finite value never does."""
    if new is None or not math.isfinite(new):
        return False
    return old is None or (new > old if mode == "max" else new < old)


def is_eval_step(step: int, settings: LoopSettings) -> bool:
    return step % settings.eval_every == 0 or step == settings.max_steps


def split(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    """The index-th of `parts` near-equal contiguous slices of a batch (sizes differ by at most one)."""
    return {k: torch.tensor_split(v, parts)[index] for k, v in batch.items()}


def batch_problems(batch_size: int, accumulation: int, workers: int = 1) -> list[str]:
    """The loop cuts every batch into workers x accumulation slices; none may be empty."""
    if batch_size >= workers * accumulation:
        return []
    return [f"training.batch_size: {batch_size} is below workers_per_trial x gradient_accumulation_steps "
            f"({workers} x {accumulation}): a micro-batch would get no examples"]


def batch_size_of(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


class Stepper:
    """Backward, optimizer step and schedule of a one-process trial: autocast to the chosen
    precision, loss scaling for fp16, clipping, then the method's own hook before gradients go."""

    world, rank = 1, 0

    def __init__(self, model: nn.Module, settings: LoopSettings, device: torch.device,
                 after_step: Callable[[int], None] = lambda step: None) -> None:
        if not is_quantized(model):
            model.to(device)
        self.module, self.settings, self.device, self.after_step = model, settings, device, after_step
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, settings)
        # fp16's narrow range underflows small gradients; the scaler keeps them representable.
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.settings.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's part of the global batch."""
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**batch).loss

    def reduce(self, value: torch.Tensor) -> float:
        """The sum of `value` over all processes of the trial."""
        return value.item()

    def backward(self, loss: torch.Tensor, share: float) -> None:
        """Accumulate the gradient of a micro-batch that holds `share` of the global batch."""
        self.scaler.scale(loss * share).backward()

    def step(self, step: int) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.after_step(step)
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def refresh(self, done: int) -> None:
        """A new optimizer for the parameters trainable now (a method removed some), the schedule
        continuing after step `done`; the moments of the removed and resized tensors go with them."""
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, self.settings, done)

    parameters_in_state = True
    """Whether the loop's checkpoint holds the trainable parameters (a DeepSpeed engine saves its own)."""

    def save_state(self, folder: Path) -> dict:
        """The optimizer, schedule and scaler for the loop's checkpoint; a stepper that keeps state
        of its own writes it into `folder` too."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state(self, folder: Path, state: dict) -> None:
        """Put back what save_state gave (and wrote into `folder`)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def save(self, save: Callable[[nn.Module, Path], None], path: Path) -> bool:
        """Save the adapter; True where this process wrote it."""
        save(self.module, path)
        return True


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

    def costs(self, static: Costs) -> Costs:
        return replace(static, train_seconds=self.train_seconds,
                       samples_per_second=self.examples / self.train_seconds if self.train_seconds else 0.0,
                       peak_memory_bytes=peak_memory_bytes(self.device))

    def progress(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "examples": self.examples}

    def take_loss(self) -> float | None:
        """Mean train loss since the last call."""
        if not self.loss_count:
            return None
        mean = self.loss_sum / self.loss_count
        self.loss_sum, self.loss_count = 0.0, 0
        return mean


@dataclass(frozen=True)
class Reshaping:
    """How a method whose model is not what `apply` alone builds meets the loop: `prune` after a
    step (the fractions it removed, or None when it did nothing); the structure its calibration or
    pruning decided, and the frozen tensors that belong to its adapter, which a checkpoint records
    and a resumed trial puts back (instead of calibrating again) before its trained tensors."""

    prune: Callable[[int], dict[str, float] | None]
    structure: Callable[[], dict | None]
    restructure: Callable[[dict], None]
    frozen: Callable[[], dict[str, torch.Tensor]] = lambda: {}
    restore_frozen: Callable[[dict[str, torch.Tensor]], None] = lambda tensors: None


@dataclass
class TrialLoop:
    """What one trial trains and where it reports; `train` runs it."""

    task: object
    """The Task: train_batches, evaluate, retention."""
    settings: LoopSettings
    stepper: Stepper
    seed: int
    static: Costs
    """Parameter counts, known before training."""
    report: Callable[[TrialReport], None]
    save: Callable[[nn.Module, Path], None] | None
    """The method's save; None saves nothing."""
    adapter_dir: Path | None
    node: str | None = None
    publish: Callable[[Path], str | None] | None = None
    """After the save: upload the adapter folder where the trial's runs are tracked; its URI."""
    checkpoint: Callable[[TrialReport, Callable[[Path], None]], None] | None = None
    """Report an evaluation with a checkpoint: called with the record and a function that writes this
    process's trainable state into a folder (see checkpoint.py); None: never."""
    checkpoint_every: int = 0
    """Evaluations between checkpoints; 0 never."""
    resume: Path | None = None
    """A checkpoint folder of this trial (its owner checked) to continue from; its step's batches
    are skipped, not trained again."""
    rungs: Callable[[int, float | None], bool] | None = None
    """At each evaluation before the last: given the step and its validation metric, whether the
    trial goes on (see rungs.py); None: every trial trains to the end."""
    reshaping: Reshaping | None = None
    """The method's structural changes during training; None for methods that make none."""
    figures: dict[str, float] = field(default_factory=dict)
    """Figures known before training (calibration's, the untouched model's bias scores), reported
    with the last record; pruning adds its own."""
    final_evaluation: Callable[[nn.Module, torch.device], dict[str, float]] | None = None
    """Evaluations of the kept checkpoint beyond the task's (bias scores), by prefixed name."""
    _resumed_from: int | None = field(default=None, init=False)
    _selected: dict | None = field(default=None, init=False)
    """The kept evaluation so far: step, validation metrics and (select best) the trained weights."""
    _reported: bool = field(default=False, init=False)

    def _report(self, meter: Meter, step: int, adapter_bytes: int | None = None,
                state: Callable[[Path], None] | None = None, **extra) -> TrialReport:
        costs = replace(meter.costs(self.static), adapter_bytes=adapter_bytes)
        record = TrialReport(step=step, max_steps=self.settings.max_steps, costs=costs,
                             train_loss=meter.take_loss(), lr=self.stepper.lr(), node=self.node,
                             resumed_from=None if self._reported else self._resumed_from, **extra)
        self._reported = True
        if state is not None:
            self.checkpoint(record, state)
        else:
            self.report(record)
        return record

    def _checkpoints_at(self, step: int) -> bool:
        """Every checkpoint_every-th evaluation before the last step (the last one saves the adapter)."""
        if not (self.checkpoint and self.checkpoint_every):
            return False
        evaluations = step // self.settings.eval_every
        return step < self.settings.max_steps and step % self.settings.eval_every == 0 \
            and evaluations % self.checkpoint_every == 0

    def _state_writer(self, step: int, meter: Meter) -> Callable[[Path], None]:
        def write(folder: Path) -> None:
            stepper_state = self.stepper.save_state(folder)
            decided = self.reshaping
            extra = {"selected": self._selected, "figures": dict(self.figures),
                     "calibration_seconds": self.static.calibration_seconds,
                     "structure": decided.structure() if decided else None,
                     "frozen": {k: v.detach().cpu().clone() for k, v in decided.frozen().items()} if decided else {}}
            state = checkpoint.capture(self.stepper.module, step, stepper_state, meter.progress(),
                                       parameters=self.stepper.parameters_in_state, extra=extra)
            checkpoint.write(state, folder, rank=self.stepper.rank)

        return write

    def _continue(self, meter: Meter, batches: Iterator) -> int:
        """Restore the resumed state; the step to continue after."""
        state = checkpoint.read_state(self.resume, rank=self.stepper.rank)
        extra = state.get("extra", {})
        if self.reshaping is not None and (extra.get("structure") is not None or extra.get("frozen")):
            # What calibration or pruning decided, so the checkpoint's tensors fit (and the data
            # need not be read again): the structure first, then the frozen tensors it holds.
            if extra.get("structure") is not None:
                self.reshaping.restructure(extra["structure"])
            self.reshaping.restore_frozen(extra.get("frozen") or {})
            self.stepper.refresh(state["step"])
            self.static = replace(self._counted(), calibration_seconds=extra.get("calibration_seconds", 0.0))
        self.figures.update(extra.get("figures") or {})
        self.stepper.load_state(self.resume, state["stepper"])
        checkpoint.restore(self.stepper.module, state)  # after the stepper: the random states last
        self._selected = extra.get("selected")
        meter.train_seconds, meter.examples = state["progress"]["train_seconds"], int(state["progress"]["examples"])
        for _ in range(state["step"]):  # the same data order as an uninterrupted run
            next(batches)
        self._resumed_from = state["step"]
        return state["step"]

    def _counted(self) -> Costs:
        trainable, total = count_parameters(self.stepper.module)
        return replace(self.static, trainable_params=trainable, total_params=total)

    def _reshape(self, step: int) -> None:
        """After a step: let the method prune; what it removed is gone for good, so the optimizer is
        made anew, the counts are taken again, and only later evaluations can be kept."""
        removed = self.reshaping.prune(step) if self.reshaping else None
        if removed is None:
            return
        self.stepper.refresh(step)
        self.static = self._counted()
        self.figures.update(removed)
        self._selected = None  # its weights no longer fit the model

    def _evaluate(self, split: str = "validation") -> dict[str, float]:
        with self.stepper.autocast():
            return self.task.evaluate(self.stepper.module, self.settings.eval_batch_size, self.stepper.device,
                                      split=split)

    def _consider(self, step: int, metrics: dict[str, float]) -> None:
        """Keep this evaluation if `select` prefers it to the one kept so far."""
        settings, kept = self.settings, self._selected
        if settings.select == "last":
            self._selected = {"step": step, "metrics": metrics}
        elif kept is None or better(metrics.get(settings.metric), kept["metrics"].get(settings.metric), settings.mode):
            self._selected = {"step": step, "metrics": metrics, "weights": checkpoint.weights(self.stepper.module)}

    def _finish(self, step: int, metrics: dict[str, float], outcome: Outcome) -> dict:
        """Restore the kept evaluation's weights, test them once, save the adapter, then measure
        retention against the untouched model."""
        kept = self._selected or {"step": step, "metrics": metrics}
        if kept["step"] != step and "weights" in kept:
            checkpoint.put_back(self.stepper.module, kept["weights"])
        test = self._evaluate("test")
        wrote = self.save is not None and self.stepper.save(self.save, self.adapter_dir)
        # At full precision, as the untouched model's reference was taken.
        retention = self.task.retention(self.stepper.module, self.stepper.device)
        figures = dict(self.figures)
        if self.final_evaluation is not None:
            figures.update(self.final_evaluation(self.stepper.module, self.stepper.device))
        extra: dict = {"metrics": metrics, "outcome": outcome, "selected_step": kept["step"],
                       "selected_metrics": {**kept["metrics"], **retention}, "test_metrics": test,
                       "figures": figures}
        if wrote:
            extra.update(adapter_path=str(self.adapter_dir), adapter_bytes=directory_bytes(self.adapter_dir))
            if self.publish is not None:
                extra["adapter_uri"] = self.publish(self.adapter_dir)
        return extra

    def train(self) -> TrialReport:
        """Train for max_steps, or until a rung stops the trial; report progress every log_every
        steps and validation metrics at each evaluation; the last report, after the test and the
        save, carries the outcome. Returns that last report."""
        settings, stepper = self.settings, self.stepper
        stepper.module.train()
        batches: Iterator = self.task.train_batches(settings.batch_size, self.seed)
        meter = Meter(stepper.device)
        record = None
        done = self._continue(meter, batches) if self.resume else 0
        for step in range(done + 1, settings.max_steps + 1):
            started = time.perf_counter()
            batch = next(batches)  # the global batch: every process draws the same one
            size, local = batch_size_of(batch), stepper.local(batch)
            step_loss = 0.0
            for i in range(settings.accumulation):
                micro = {k: v.to(stepper.device) for k, v in split(local, settings.accumulation, i).items()}
                share = batch_size_of(micro) / size
                with stepper.autocast():
                    loss = stepper.forward(micro)
                # A sync point every micro-batch, but then every process sees a NaN at the same
                # step and all stop together.
                step_loss += stepper.reduce(loss.detach().float() * share)
                check_finite(step_loss, step)
                stepper.backward(loss, share)
            stepper.step(step)
            self._reshape(step)
            meter.add(time.perf_counter() - started, size, step_loss)

            if is_eval_step(step, settings):
                metrics = self._evaluate()
                self._consider(step, metrics)
                last = step == settings.max_steps
                if not last and self.rungs is not None and not self.rungs(step, metrics.get(settings.metric)):
                    return self._report(meter, step, **self._finish(step, metrics, Outcome.EARLY_STOPPED))
                extra = self._finish(step, metrics, Outcome.COMPLETED) if last else {"metrics": metrics}
                if self._checkpoints_at(step):
                    extra["state"] = self._state_writer(step, meter)
                record = self._report(meter, step, **extra)
            elif step % settings.log_every == 0:
                record = self._report(meter, step)
        return record


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def is_quantized(model: nn.Module) -> bool:
    """A bitsandbytes-quantized model is placed on its device at load and cannot be moved."""
    return any(getattr(m, "is_loaded_in_4bit", False) or getattr(m, "is_loaded_in_8bit", False)
               for m in model.modules())


def train(model: nn.Module, task, settings: LoopSettings, *, seed: int, device: torch.device,
          report: Callable[[TrialReport], None] = lambda record: None,
          after_step: Callable[[int], None] = lambda step: None, reshaping: Reshaping | None = None) -> TrialReport:
    """The loop in one process without Ray and without saving (tests, benchmarks, notebooks)."""
    trainable, total = count_parameters(model)
    stepper = Stepper(model, settings, device, after_step=after_step)
    return TrialLoop(task=task, settings=settings, stepper=stepper, seed=seed, static=Costs(trainable, total),
                     report=report, save=None, adapter_dir=None, reshaping=reshaping).train()
