"""Multi-worker trials: a Tune trial drives a Ray Train run whose workers train one DeepSpeed engine.

Every worker builds the same trial (`prepare_trial`) and trains on its slice of every global
batch, so the data order and batch equal a single-process run's; rank 0 reports and saves.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import UserError
from peftlab.spec import DeepSpeedSpec
from peftlab.workers.trial import TrialContext, directory_bytes, prepare_trial


def deepspeed_config(spec: DeepSpeedSpec, *, batch_size: int, max_grad_norm: float, world_size: int,
                     bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config for one trial; batch sizes are bookkeeping, the loop cuts the batches."""
    per_micro_batch = -(-batch_size // (world_size * spec.gradient_accumulation_steps))
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": per_micro_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # The client optimizer is torch's AdamW: DeepSpeed's own CPU Adam would JIT-compile C++.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


def shard(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    """The index-th of `parts` near-equal contiguous slices of a batch (sizes differ by at most one)."""
    return {k: torch.tensor_split(v, parts)[index] for k, v in batch.items()}


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: build the trial, train it with DeepSpeed, report from rank 0."""
    context: TrialContext = loop_config["context"]
    spec: DeepSpeedSpec = loop_config["deepspeed"]
    on_gpu = context.gpus > 0
    if not on_gpu:
        # DeepSpeed picks its accelerator once, at its first import (transformers may import it
        # too), so this comes first; on CPU it trains over gloo.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    from peftlab.workers.methods.base import Method
    from peftlab.workers.train import Meter, check_finite, is_eval_step, optimizer_and_schedule

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    if rank == 0:
        loop_config["worker_groups"].put(ray.util.get_current_placement_group())
    trial = prepare_trial(loop_config["config"], context)
    model, method, task, settings, device = trial.model, trial.method, trial.task, trial.settings, trial.device
    if type(method).on_step is not Method.on_step:
        # Such methods read every parameter's full gradient after each step; ZeRO shards and frees it.
        raise UserError(f"method {method.name} reshapes itself from gradients during training; "
                        "run it with resources.workers_per_trial: 1")
    accumulation = spec.gradient_accumulation_steps
    if settings.batch_size < world * accumulation:
        raise UserError(f"training.batch_size {settings.batch_size} is below workers_per_trial x "
                        f"gradient_accumulation_steps ({world} x {accumulation}): a worker would get no examples")

    # Only the trainable (PEFT) parameters reach the optimizer, so ZeRO shards only their state.
    optimizer, scheduler = optimizer_and_schedule([p for p in model.parameters() if p.requires_grad], settings)
    bf16 = on_gpu if spec.bf16 == "auto" else spec.bf16
    config = deepspeed_config(spec, batch_size=settings.batch_size, max_grad_norm=settings.max_grad_norm,
                              world_size=world, bf16=bf16)
    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, about 100 s on two
        # cores) that only its inference and tensor-parallel layers use; training collectives go
        # through torch.distributed (gloo). DeepSpeed keeps this probe result for the process.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    module = engine.module
    batches = task.train_batches(settings.batch_size, trial.seed)
    static = {**trial.static, "node": ray.get_runtime_context().get_node_id()}

    meter = Meter(device)
    for step in range(1, settings.max_steps + 1):
        started = time.perf_counter()
        batch = next(batches)  # the global batch: every rank draws the same one
        size = len(batch["labels"])
        local, step_loss = shard(batch, world, rank), 0.0
        for i in range(accumulation):
            micro = {k: v.to(device) for k, v in shard(local, accumulation, i).items()}
            loss = engine(**micro).loss
            # This micro-batch's part of the global batch's mean loss, summed over ranks: a sync
            # point, but then every rank sees a NaN at the same step and all stop together.
            part = loss.detach().float() * (len(micro["labels"]) / size)
            dist.all_reduce(part)
            step_loss += part.item()
            check_finite(step_loss, step)
            # DeepSpeed averages gradients over ranks and accumulation steps; this weight makes
            # that average the global batch's mean gradient even when slices differ in size.
            engine.backward(loss * (len(micro["labels"]) * accumulation * world / size))
            engine.step()  # the optimizer (and schedule) steps at the last micro-batch only
        meter.add(time.perf_counter() - started, size, step_loss)

        if not is_eval_step(step, settings):
            continue
        # Every rank evaluates the whole set: under ZeRO-3 each forward gathers parameters
        # from all ranks, so all must run the same forwards; rank 0's numbers are reported.
        metrics = task.evaluate(module, settings.eval_batch_size, device)
        result = meter.report(step, metrics, scheduler.get_last_lr()[0])
        if step == settings.max_steps:
            result.update(_finish(module, method, task, device, loop_config["adapter_dir"], rank))
        ray.train.report({**result, **static})


def _finish(module: torch.nn.Module, method, task, device: torch.device, adapter_dir: str, rank: int) -> dict:
    """Save the adapter once (rank 0, from whole parameters under ZeRO-3), then measure retention."""
    import deepspeed

    path = Path(adapter_dir)
    # Methods save only trainable tensors, so only those are gathered: the frozen backbone
    # never has to fit whole on one rank. Outside ZeRO-3 this gathers nothing.
    trainable = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if rank == 0:
            method.save(module, path)
    retention = {f"eval/{k}": v for k, v in task.retention(module, device).items()}
    if rank != 0:
        return retention
    return {**retention, "adapter_bytes": directory_bytes(path), "adapter_path": str(path)}


_worker_groups = None
"""In a trial's process: the queue through which rank 0 sends its workers' placement group."""


class _RemovesWorkersWhenStopped:
    """Tune stops a trial (ASHA at a rung, or at max_t with the final result) by killing its
    process, and with it the Ray Train controller, before that can remove its workers'
    placement group. Ray Train's own cleaner for this asks Ray's dashboard, which a local run
    does not start (ray-project/ray#54305); a group left behind holds its CPUs and GPUs until
    the sweep ends and starves the next trials. So the trial removes it when Tune stops it."""

    def cleanup(self) -> None:
        from ray.util import remove_placement_group

        try:
            super().cleanup()  # first: the session ends, so the workers' deaths are no trial error
        finally:
            if _worker_groups is not None and not _worker_groups.empty():
                remove_placement_group(_worker_groups.get_nowait())


def run_distributed_trial(config: dict, context: TrialContext, *, workers: int, deepspeed: DeepSpeedSpec) -> None:
    """The Tune function trainable of a multi-worker trial: one Ray Train run of `workers` workers,
    whose rank-0 reports reach Tune through `TuneReportCallback`."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    global _worker_groups
    _worker_groups = Queue(actor_options={"num_cpus": 0})  # reserves nothing: the workers hold the CPUs
    trial_id = tune.get_context().get_trial_id()
    per_worker = {"CPU": context.cpus, **({"GPU": context.gpus} if context.gpus > 0 else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config, "context": context, "deepspeed": deepspeed, "worker_groups": _worker_groups,
            "adapter_dir": str(Path(context.adapters_dir) / context.experiment / trial_id),
        },
        scaling_config=train.ScalingConfig(num_workers=workers, use_gpu=context.gpus > 0,
                                           resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=f"train-{trial_id}",  # stable per trial, as Train V2 asks
            storage_path=tune.get_context().get_trial_dir(),
            callbacks=[TuneReportCallback()],
            failure_config=train.FailureConfig(max_failures=0),  # Tune's own failure policy decides
        ),
    )
    try:
        trainer.fit()
    except train.WorkerGroupError as exc:
        # The worker's own exception (NonFiniteLoss, UserError) is the trial's error, lowest rank first.
        raise exc.worker_failures[min(exc.worker_failures)] from None


# Tune builds the trial's class from these mixins and its function trainable class.
run_distributed_trial.__mixins__ = (_RemovesWorkersWhenStopped,)
