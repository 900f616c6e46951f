"""Multi-worker trials: a Tune trial drives a Ray Train run whose workers train one DeepSpeed engine.

Every worker builds the same trial (`prepare_trial`) and runs the shared loop (train.TrialLoop) on
its slice of every global batch, with DeepSpeed as the stepper; rank 0 reports and saves.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.spec import DeepSpeedSpec, ResourcesSpec, TrainingSpec
from peftlab.workers.train import LoopSettings, Stepper, TrialLoop, batch_problems, optimizer_and_schedule, split
from peftlab.workers.trial import (
    TrialContext,
    adapter_dir_of,
    checkpoint_reporter,
    failures_recorded,
    prepare_trial,
    publisher,
    replay_if_finished,
    resumed_checkpoint,
    rungs_for,
)


def multi_worker_problems(methods: list[str], training: TrainingSpec, resources: ResourcesSpec, *,
                          quantized: bool = False, zero_stage: int = 0) -> list[str]:
    """What a multi-worker (DeepSpeed) trial cannot do, as one-line problems; the spec's validation
    and each worker at its start ask this one place."""
    from peftlab.workers.methods import all_methods
    from peftlab.workers.methods.base import Method

    registry = all_methods()
    workers, accumulation = resources.workers_per_trial, training.gradient_accumulation_steps
    problems = batch_problems(training.batch_size, accumulation, workers)
    if quantized:
        problems.append("quantization: runs in one-process trials; use workers_per_trial: 1")
    if zero_stage == 3 and training.select == "best":
        # Stage 3 shards the parameters themselves, so no rank holds the best evaluation's weights.
        problems.append("training.select: best keeps the best evaluation's weights, which ZeRO stage 3 "
                        "shards across workers; use select: last or zero_stage: 2")
    for name in methods:
        method = registry.get(name)  # an unknown name is reported by the spec's method check
        if method is not None and (type(method).on_step is not Method.on_step or method.prunes):
            # Such methods read every parameter's full gradient after each step; ZeRO shards and frees it.
            problems.append(f"methods.{name}: reshapes itself from gradients during training, which "
                            "multi-worker (DeepSpeed) trials do not support; use workers_per_trial: 1")
        elif method is not None and method.calibrates:
            # Each worker would calibrate on its own shard and select differently.
            problems.append(f"methods.{name}: calibrates on the training data in one process before "
                            "training, which multi-worker (DeepSpeed) trials do not support; use workers_per_trial: 1")
    return problems


def deepspeed_config(spec: DeepSpeedSpec, settings: LoopSettings, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config for one trial; batch sizes are bookkeeping, the loop cuts the batches."""
    per_micro_batch = -(-settings.batch_size // (world_size * settings.accumulation))
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": per_micro_batch,
        "gradient_accumulation_steps": settings.accumulation,
        "gradient_clipping": settings.max_grad_norm,
        # DeepSpeed keeps its own low-precision weights (and fp16 loss scale): no autocast on top.
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16"},
        "zero_optimization": zero,
        # The client optimizer is torch's AdamW: DeepSpeed's own CPU Adam would JIT-compile C++.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


ENGINE_FOLDER, ENGINE_TAG = "deepspeed", "state"
"""Where in a trial's checkpoint the DeepSpeed engine's files go."""


class DeepSpeedStepper(Stepper):
    """The loop's stepper for one DeepSpeed worker: the engine does backward, clipping, the
    optimizer and the schedule (at the last micro-batch of each step); ranks share each batch."""

    parameters_in_state = False  # the engine saves them, partitioned as it holds them

    def __init__(self, model: nn.Module, settings: LoopSettings, device: torch.device, spec: DeepSpeedSpec,
                 *, on_gpu: bool) -> None:
        import deepspeed
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.settings, self.device, self.after_step = settings, device, lambda step: None
        # Only the trainable (PEFT) parameters reach the optimizer, so ZeRO shards only their state.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, settings)
        if not on_gpu:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, about 100 s on two
            # cores) that only its inference and tensor-parallel layers use; training collectives go
            # through torch.distributed (gloo). DeepSpeed keeps this probe result for the process.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(spec, settings, world_size=self.world))
        self.module = self.engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return split(batch, self.world, self.rank)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**batch).loss

    def reduce(self, value: torch.Tensor) -> float:
        import torch.distributed as dist

        dist.all_reduce(value)
        return value.item()

    def backward(self, loss: torch.Tensor, share: float) -> None:
        # DeepSpeed averages gradients over ranks and accumulation steps; this weight makes that
        # average the global batch's mean gradient even when slices differ in size.
        self.engine.backward(loss * (share * self.settings.accumulation * self.world))
        self.engine.step()  # the optimizer (and schedule) steps at the last micro-batch only

    def step(self, step: int) -> None:
        """Already stepped by the engine at the step's last micro-batch."""

    def save_state(self, folder: Path) -> dict:
        """Each rank writes its partition of the engine's state (trainable weights, optimizer,
        schedule, loss scale) into its folder; the trial's checkpoint unites the ranks' folders."""
        self.engine.save_checkpoint(str(folder / ENGINE_FOLDER), tag=ENGINE_TAG, exclude_frozen_parameters=True)
        return {}

    def load_state(self, folder: Path, state: dict) -> None:
        # DeepSpeed unpickles its files: the caller checked that this trial wrote them.
        loaded, _ = self.engine.load_checkpoint(str(folder / ENGINE_FOLDER), tag=ENGINE_TAG,
                                                load_module_strict=False)  # frozen weights are not in it
        if loaded is None:
            raise ValueError(f"checkpoint {folder} holds no DeepSpeed state for rank {self.rank}")

    def save(self, save: Callable[[nn.Module, Path], None], path: Path) -> bool:
        """Rank 0 saves, from whole parameters under ZeRO-3. Methods save only trainable tensors,
        so only those are gathered: the frozen backbone never has to fit whole on one rank."""
        import deepspeed

        trainable = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if self.rank == 0:
                save(self.module, path)
        return self.rank == 0


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: build the trial, run the shared loop with DeepSpeed."""
    context: TrialContext = loop_config["context"]
    spec: DeepSpeedSpec = loop_config["deepspeed"]
    on_gpu = context.gpus > 0
    if not on_gpu:
        # DeepSpeed picks its accelerator once, at its first import (transformers may import it
        # too), so this comes first; on CPU it trains over gloo.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        loop_config["worker_groups"].put(ray.util.get_current_placement_group())
    problems = multi_worker_problems([loop_config["config"]["method"]], context.training, loop_config["resources"],
                                     quantized=context.quantization is not None,
                                     zero_stage=loop_config["deepspeed"].zero_stage)
    if problems:
        raise UserError("; ".join(problems))
    trial = prepare_trial(loop_config["config"], context)
    stepper = DeepSpeedStepper(trial.model, trial.settings, trial.device, spec, on_gpu=on_gpu)
    trial_id, node = loop_config["trial_id"], ray.get_runtime_context().get_node_id()
    owner = context.checkpoint_owner(trial_id)
    here = loop_config["checkpoints"] and context.can_checkpoint(rank_nodes(node))
    reporter = checkpoint_reporter(owner, ray.train.report, ray.train.Checkpoint, rank=stepper.rank) if here else None
    # Every rank calls report (Ray Train's barrier) and Tune keeps rank 0's; under ZeRO-3 every
    # rank must also run the same evaluation forwards, as each gathers parameters from all. Ranks
    # placed where the storage cannot be reached start from step 0, all of them alike.
    with resumed_checkpoint(ray.train.get_checkpoint() if here else None, owner) as resume:
        TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed, static=trial.static,
                  report=lambda record: ray.train.report(record.to_result()), save=trial.method.save,
                  adapter_dir=adapter_dir_of(context, trial_id), node=node, publish=publisher(context, trial_id),
                  checkpoint=reporter, checkpoint_every=context.training.checkpoint_every, resume=resume,
                  rungs=rungs_for(context, trial_id)).train()


def rank_nodes(node: str) -> list[str]:
    """The Ray nodes of every rank of this trial (a collective: every rank calls it)."""
    import torch.distributed as dist

    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [n for n in nodes if n is not None]


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


def run_distributed_trial(config: dict, context: TrialContext, *, resources: ResourcesSpec,
                          deepspeed: DeepSpeedSpec) -> None:
    """The Tune function trainable of a multi-worker trial: one Ray Train run of `workers` workers,
    whose rank-0 reports reach Tune through `TuneReportCallback`."""
    import ray
    from ray import train, tune
    from ray.train._internal.session import get_storage  # Tune's storage of this trial
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    trial_id = tune.get_context().get_trial_id()
    if replay_if_finished(context, trial_id, lambda record: tune.report(record.to_result())):
        return
    # Ray Train keeps the run's checkpoints in this trial's folder of Tune's storage, so a retry or
    # a resume finds them; a storage that is local to another node would not be, and gets none.
    tune_storage = get_storage()
    checkpoints = context.can_checkpoint([ray.get_runtime_context().get_node_id()])
    global _worker_groups
    _worker_groups = Queue(actor_options={"num_cpus": 0})  # reserves nothing: the workers hold the CPUs
    per_worker = {"CPU": context.cpus, **({"GPU": context.gpus} if context.gpus > 0 else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config, "context": context, "deepspeed": deepspeed, "resources": resources,
            "worker_groups": _worker_groups, "trial_id": trial_id, "checkpoints": checkpoints,
        },
        scaling_config=train.ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=context.gpus > 0,
                                           resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=f"train-{trial_id}",  # stable per trial, as Train V2 asks: a rerun continues its run
            storage_path=tune_storage.trial_fs_path if checkpoints else tune.get_context().get_trial_dir(),
            storage_filesystem=tune_storage.storage_filesystem if checkpoints else None,
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
            failure_config=train.FailureConfig(max_failures=0),  # Tune's own failure policy decides
        ),
    )
    with failures_recorded(Path(tune.get_context().get_trial_dir())):
        try:
            trainer.fit()
        except train.WorkerGroupError as exc:
            # The worker's own exception (NonFiniteLoss, UserError) is the trial's error, lowest rank first.
            raise exc.worker_failures[min(exc.worker_failures)] from None


# Tune builds the trial's class from these mixins and its function trainable class.
run_distributed_trial.__mixins__ = (_RemovesWorkersWhenStopped,)
