"""VeRA, LoHa, LoKr and AdaLoRA through peft: additive updates W' = W + dW with a structured dW
(shared random projections, a Hadamard or Kronecker product, an adaptively pruned SVD form)."""
from __future__ import annotations

from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig
from peft.tuners.lokr.layer import factorization
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import UserError

from .base import TARGET_MODULES, HParam, TaskInfo
from .peft_backed import peft_task_type
from .peft_orthogonal import PerLayerPeftMethod, Shape, targets_of
from .registry import register


@register
class VeRA(PerLayerPeftMethod):
    """dW = diag(lambda_b) B diag(lambda_d) A: A (r x d_in) and B (d_out x r) are random, frozen and shared by
    all target layers (peft draws them once at the largest target shape from projection_seed and slices
    them per layer); only the vectors lambda_d (length r, init d_initial) and lambda_b (length d_out,
    init 0) train. The projections are buffers saved with the adapter (peft's save_projection), so they
    add to its size on disk but not to the trainable count."""

    name = "vera"
    summary = "trained scaling vectors around frozen random low-rank projections shared by all layers, and the head"
    paper = "Kopiczko et al. 2023, VeRA: Vector-based Random Matrix Adaptation, arXiv 2310.11454"
    formula = "r + d_out per target layer (the shared random A, B are frozen) + head"
    mergeable = True
    identity_at_init = True  # lambda_b starts at zero
    default_lr = 5e-3  # two vectors per layer need a larger step than LoRA (the paper uses 4e-3 to 1e-2)
    layer_types = (nn.Linear, Conv1D)  # peft's tuner handles GPT-2's Conv1D (fan_in_fan_out)
    hparams = (
        HParam("r", int, 256, "rank of the shared random projections; cheap, so larger than a LoRA rank",
               low=1, size=True),
        TARGET_MODULES,
        HParam("dropout", float, 0.0, "dropout on the adapter's input", low=0.0, high=1.0),
        HParam("d_initial", float, 0.1, "initial value of every lambda_d entry (the paper recommends <= 0.1)"),
        HParam("projection_seed", int, 0, "seed of the shared random projections (peft's projection_prng_key)",
               low=0),
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> VeraConfig:
        return VeraConfig(
            task_type=peft_task_type(task),
            r=hp["r"],
            target_modules=targets_of(model, hp),
            vera_dropout=hp["dropout"],
            d_initial=hp["d_initial"],
            projection_prng_key=hp["projection_seed"],
            modules_to_save=list(task.head_modules),
        )

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        return hp["r"] + d_out


LYCORIS_HPARAMS = (
    HParam("r", int, 8, "rank of each low-rank factor", low=1, size=True),
    HParam("alpha", float, 8, "update scaled by alpha/r", low=0.0, open_low=True),
    TARGET_MODULES,
    HParam("rank_dropout", float, 0.0, "during training, drop each output row of the update with this probability",
           low=0.0, high=1.0),
    HParam("module_dropout", float, 0.0, "during training, skip a layer's whole update with this probability",
           low=0.0, high=1.0),
)


@register
class LoHa(PerLayerPeftMethod):
    """dW = (alpha/r) (B1 A1) * (B2 A2), the element-wise product of two rank-r products (FedPara), so
    dW can reach rank r^2 for the parameters of a rank-2r LoRA. A2 starts at zero."""

    name = "loha"
    summary = "an update that is the Hadamard product of two low-rank products beside each target layer, and the head"
    paper = ("Hyeon-Woo et al. 2021, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated "
             "Learning, arXiv 2108.06098")
    formula = "2*r*(d_in+d_out) per target layer + head"
    mergeable = True
    identity_at_init = True  # one factor of the second product starts at zero
    default_lr = 5e-4
    hparams = LYCORIS_HPARAMS

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> LoHaConfig:
        return LoHaConfig(
            task_type=peft_task_type(task),
            r=hp["r"],
            alpha=hp["alpha"],
            rank_dropout=hp["rank_dropout"],
            module_dropout=hp["module_dropout"],
            target_modules=targets_of(model, hp),
            modules_to_save=list(task.head_modules),
        )

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        return 2 * hp["r"] * (d_in + d_out)


@register
class LoKr(PerLayerPeftMethod):
    """dW = (alpha/r) W1 kron W2. peft factors d_out = a*b and d_in = c*d (a <= b and c <= d, near the square
    roots, or a = c = decompose_factor where it divides), W1 is a x c and W2 is b x d. W2 is stored as a
    rank-r product only while r < max(b, d)/2 and as a full matrix from there on (likewise W1 with
    decompose_both), so the count stops growing, and can even drop, once r passes that point: sizing
    scans every r up to it. W1 starts at zero."""

    name = "lokr"
    summary = "an update that is a Kronecker product of two small (optionally low-rank) factors, and the head"
    paper = ("Yeh et al. 2023, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model "
             "Evaluation, arXiv 2309.14859")
    formula = ("per target layer, with d_out = a*b and d_in = c*d as peft factors them: "
               "(a*c, or r*(a+c) with decompose_both and r < max(a,c)/2) + (b*d, or r*(b+d) if r < max(b,d)/2) + head")
    mergeable = True
    identity_at_init = True  # W1 starts at zero
    default_lr = 1e-3
    hparams = (
        *LYCORIS_HPARAMS,
        HParam("decompose_both", bool, False,
               "also store the small factor W1 as a rank-r product when that is smaller"),
        HParam("decompose_factor", int, None,
               "size of the first factor of each dimension where it divides it; default: the factors nearest the "
               "square root (peft's -1)", low=1),
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> LoKrConfig:
        return LoKrConfig(
            task_type=peft_task_type(task),
            r=hp["r"],
            alpha=hp["alpha"],
            rank_dropout=hp["rank_dropout"],
            module_dropout=hp["module_dropout"],
            decompose_both=hp["decompose_both"],
            decompose_factor=hp["decompose_factor"] or -1,
            target_modules=targets_of(model, hp),
            modules_to_save=list(task.head_modules),
        )

    def _factors(self, hp: dict, d_in: int, d_out: int) -> tuple[int, int, int, int]:
        (a, b), (c, d) = (factorization(dim, hp["decompose_factor"] or -1) for dim in (d_out, d_in))
        return a, b, c, d

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        r = hp["r"]
        a, b, c, d = self._factors(hp, d_in, d_out)
        w1 = r * (a + c) if hp["decompose_both"] and r < max(a, c) / 2 else a * c
        w2 = r * (b + d) if r < max(b, d) / 2 else b * d
        return w1 + w2

    def _size_range(self, hp: dict, shapes: list[Shape]) -> range:
        # Past every layer's threshold each factor is a full matrix and r no longer changes the count.
        last = max((max(self._factors(hp, d_in, d_out)) for _, d_in, d_out in shapes), default=2)
        return range(1, last // 2 + 2)


@register
class AdaLoRA(PerLayerPeftMethod):
    """dW = (alpha/init_r) P diag(E) Q in SVD form (P: d_out x init_r, Q: init_r x d_in, E: init_r singular
    values, zero at init), plus a penalty orth_reg_weight*|P^T P - I| + |Q Q^T - I| that peft adds to the
    model's loss. peft's rank allocator scores every triplet by sensitivity and masks the least important
    singular values, shrinking the total rank on a cubic schedule from init_r to target_r per layer
    (average) between steps tinit and total_step - tfinal. Masked entries stay parameters, so the trainable
    count is that of init_r; the saved adapter is cut to the final ranks.

    The allocation runs only if the training loop calls `on_step` after every optimizer step; without
    it AdaLoRA trains as a fixed-rank SVD-form LoRA with the orthogonality penalty."""

    name = "adalora"
    summary = "SVD-form low-rank updates whose ranks are pruned during training to a total budget, and the head"
    paper = ("Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, "
             "arXiv 2303.10512")
    formula = "init_r*(d_in+d_out+1) per target layer + head (pruned ranks are masked, not removed, in training)"
    mergeable = True
    identity_at_init = True  # the singular values E start at zero
    default_lr = 5e-4
    layer_types = (nn.Linear, Conv1D)  # peft's tuner handles GPT-2's Conv1D (fan_in_fan_out)
    hparams = (
        HParam("init_r", int, 12, "rank of every update at the start", low=1, size=True),
        HParam("target_r", int, None, "average rank per layer after allocation; default: two thirds of init_r "
               "(peft's 8 of 12), at least 1", low=1),
        HParam("alpha", float, 8, "update scaled by alpha/init_r", low=0.0, open_low=True),
        HParam("dropout", float, 0.05, "dropout on the adapter's input", low=0.0, high=1.0),
        TARGET_MODULES,
        HParam("total_step", int, None, "length of the schedule in optimizer steps; default: the run's max_steps, "
               "which the loop passes to on_step", low=1),
        HParam("tinit", int, 0, "warm-up steps before any rank is pruned", low=0),
        HParam("tfinal", int, 0, "final steps with the ranks fixed", low=0),
        HParam("deltaT", int, 1, "steps between two allocations", low=1),
        HParam("beta1", float, 0.85, "EMA factor of the sensitivity", low=0.0, high=0.999, open_low=True),
        HParam("beta2", float, 0.85, "EMA factor of the uncertainty", low=0.0, high=0.999, open_low=True),
        HParam("orth_reg_weight", float, 0.5, "weight of the orthogonality penalty added to the loss", low=0.0),
    )

    def _target_r(self, hp: dict) -> int:
        return hp["target_r"] or max(1, round(2 * hp["init_r"] / 3))

    def _total_step(self, hp: dict) -> int:
        # Until on_step learns the run's length, the shortest schedule peft accepts stands in for it.
        return hp["total_step"] or hp["tinit"] + hp["tfinal"] + 1

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> AdaLoraConfig:
        return AdaLoraConfig(
            task_type=peft_task_type(task),
            init_r=hp["init_r"],
            target_r=self._target_r(hp),
            lora_alpha=hp["alpha"],
            lora_dropout=hp["dropout"],
            target_modules=targets_of(model, hp),
            total_step=self._total_step(hp),
            tinit=hp["tinit"],
            tfinal=hp["tfinal"],
            deltaT=hp["deltaT"],
            beta1=hp["beta1"],
            beta2=hp["beta2"],
            orth_reg_weight=hp["orth_reg_weight"],
            modules_to_save=list(task.head_modules),
        )

    def _match_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> LoraConfig:
        # AdaLoRA matches targets as LoRA does; a LoraConfig cannot fail on the schedule, so counting never does.
        return LoraConfig(task_type=peft_task_type(task), target_modules=targets_of(model, hp),
                          modules_to_save=list(task.head_modules))

    def _schedule_problems(self, hp: dict, total_step: int) -> list[str]:
        if hp["tinit"] + hp["tfinal"] >= total_step:
            return [f"tinit {hp['tinit']} + tfinal {hp['tfinal']} leave no allocation phase in {total_step} steps"]
        return []

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problems = []
        if self._target_r(hp) > hp["init_r"]:
            problems.append(f"target_r {hp['target_r']} is above init_r {hp['init_r']}")
        if hp["total_step"] is not None:
            problems += self._schedule_problems(hp, hp["total_step"])
        return problems or super()._problems(model, hp, task)

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        return hp["init_r"] * (d_in + d_out + 1)

    def on_step(self, model: nn.Module, step: int, max_steps: int) -> None:
        """peft's update_and_allocate: call after each optimizer step and before the gradients are cleared
        (it scores parameters by |p * grad|). `step` counts from 1 and the last is max_steps, so the final
        allocation (at total_step - tfinal) happens inside the run."""
        tuner = model.base_model
        config = tuner.peft_config[tuner.trainable_adapter_name]
        hp = model.peftlab_applied.hparams
        if hp["total_step"] is None and config.total_step != max_steps:
            if problems := self._schedule_problems(hp, max_steps):
                raise UserError("; ".join(problems), where=f"method {self.name}")
            tuner.rankallocator.set_total_step(max_steps)  # the allocator shares the config: it is saved too
        tuner.update_and_allocate(step)
