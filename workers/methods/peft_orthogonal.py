"""OFT, BOFT and HRA through peft (OFTConfig, BOFTConfig, HRAConfig): the frozen W is multiplied by a
trained orthogonal (or reflection) matrix on its input side, W' = W R, so all three merge and start at W."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from peft import BOFTConfig, HRAConfig, OFTConfig
from torch import nn

from peftlab.errors import UserError

from .base import TARGET_MODULES, HParam, TaskInfo, head_param_count, resolve_targets
from .peft_backed import PeftMethod, peft_task_type, targeted
from .registry import register
from .wrapped import linear_dims

Shape = tuple[str, int, int]  # (module name, d_in, d_out) of one target linear layer

def targets_of(model: nn.Module, hp: dict) -> str | list[str]:
    return resolve_targets(model, hp["target_modules"]) or []


class PerLayerPeftMethod(PeftMethod):
    """A peft-backed method whose added parameters depend only on each target layer's (d_in, d_out).

    The count, the per-layer checks and the sizing all read one list of target shapes found with
    peft's own matching. peft silently adjusts some sizes that do not fit a layer (OFT's block size);
    refusing them here keeps the hyperparameter a sweep records the one that ran.
    """

    @abstractmethod
    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        """Trainable parameters the method adds to one target layer of this shape."""

    def _layer_problem(self, hp: dict, d_in: int, d_out: int) -> str | None:
        """Why these hyperparameters cannot adapt a layer of this shape, or None."""
        return None

    def _size_range(self, hp: dict, shapes: list[Shape]) -> Iterable[int] | None:
        """Sizes to scan in size_for_budget (each is kept when every layer accepts it); None when the
        count grows with the size on every layer, so the base class's bisection applies."""
        return None

    def _match_config(self, model: nn.Module, hp: dict, task: TaskInfo):
        """The config whose target_modules decide the adapted layers (peft's matching rules)."""
        return self.peft_config(model, hp, task)

    def _shapes(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[Shape]:
        return [(n, *linear_dims(m)) for n, m in targeted(model, self._match_config(model, hp, task))]

    def _count(self, model: nn.Module, hp: dict, task: TaskInfo) -> int:
        return sum(self._layer_count(hp, d_in, d_out) for _, d_in, d_out in self._shapes(model, hp, task))

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        problems = super()._problems(model, hp, task)
        if problems:
            return problems
        layers: dict[str, list[str]] = {}  # one line per distinct problem, naming the first layer
        for name, d_in, d_out in self._shapes(model, hp, task):
            if problem := self._layer_problem(hp, d_in, d_out):
                layers.setdefault(problem, []).append(name)
        return [
            f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {problem}"
            for problem, names in layers.items()
        ]

    def size_for_budget(self, model: nn.Module, hparams: dict, task: TaskInfo, budget: int) -> dict:
        hp = self.resolve(hparams)
        shapes = self._shapes(model, hp, task)
        sizes = self._size_range(hp, shapes)
        if sizes is None:
            return super().size_for_budget(model, hparams, task, budget)
        size = next(h for h in self.hparams if h.size)
        valid = [
            v for v in sizes
            if not any(self._layer_problem({**hp, size.name: v}, d_in, d_out) for _, d_in, d_out in shapes)
        ]
        if not valid:
            raise UserError(
                f"no {size.name} fits every target layer of {type(model).__name__}", where=f"method {self.name}"
            )
        budget -= head_param_count(model, task)

        def count(v: int) -> int:
            return sum(self._layer_count({**hp, size.name: v}, d_in, d_out) for _, d_in, d_out in shapes)

        return {**hp, size.name: min(valid, key=lambda v: (abs(count(v) - budget), v))}


def _block_sizes(shapes: list[Shape]) -> range:
    return range(2, min((d_in for _, d_in, _ in shapes), default=1) + 1)


@register
class OFT(PerLayerPeftMethod):
    """Orthogonal fine-tuning as peft 0.21 implements it ("OFTv2"): the input of each target layer is
    rotated by a block-diagonal R, each b x b block the Cayley transform of a trained skew-symmetric
    matrix (b(b-1)/2 numbers), so W' = W R. peft defaults to the Cayley-Neumann series (5 terms), which
    is only approximately orthogonal but avoids a matrix inverse; merging uses the same R, so it is exact.
    peft takes either r (blocks per layer) or oft_block_size; the block size is exposed because the
    count grows with it, and one that does not divide a layer's d_in is refused (peft would change it)."""

    name = "oft"
    summary = "a trained block-diagonal rotation of each target layer's input (Cayley-parametrised), and the head"
    paper = ("Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning, arXiv 2306.07280; "
             "peft implements OFTv2, Qiu et al. 2025, Orthogonal Finetuning Made Scalable, arXiv 2506.19847")
    formula = "d_in*(b-1)/2 per target layer (b = block_size; b*(b-1)/2 with block_share) + head"
    mergeable = True
    identity_at_init = True  # the skew parameters start at zero, so every block is I
    default_lr = 1e-3
    hparams = (
        HParam("block_size", int, 32, "side b of each rotation block; must divide every target layer's d_in",
               low=2, size=True),
        TARGET_MODULES,
        HParam("dropout", float, 0.0, "probability of replacing a rotation block by I during training "
               "(peft's multiplicative module_dropout)", low=0.0, high=1.0),
        HParam("use_cayley_neumann", bool, True,
               "approximate the Cayley inverse by a 5-term Neumann series (peft 0.21's default); false: exact solve"),
        HParam("block_share", bool, False, "one rotation block shared by all blocks of a layer"),
        HParam("coft", bool, False, "constrained OFT: project R back within coft_eps of I at every forward"),
        HParam("coft_eps", float, 6e-5, "COFT's radius around I (coft only)", low=0.0, open_low=True),
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> OFTConfig:
        return OFTConfig(
            task_type=peft_task_type(task),
            r=0,  # peft requires exactly one of r and oft_block_size
            oft_block_size=hp["block_size"],
            module_dropout=hp["dropout"],
            target_modules=targets_of(model, hp),
            use_cayley_neumann=hp["use_cayley_neumann"],
            block_share=hp["block_share"],
            coft=hp["coft"],
            eps=hp["coft_eps"],
            modules_to_save=list(task.head_modules),
        )

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        b = hp["block_size"]
        blocks = 1 if hp["block_share"] else d_in // b
        return blocks * b * (b - 1) // 2

    def _layer_problem(self, hp: dict, d_in: int, d_out: int) -> str | None:
        b = hp["block_size"]
        if d_in % b:
            return f"block_size {b} does not divide d_in {d_in} (peft would silently change it)"
        return None

    def _size_range(self, hp: dict, shapes: list[Shape]) -> range:
        return _block_sizes(shapes)


def _fbd_cuda_available() -> bool:
    """Whether peft's CUDA block-diagonal kernel loads; the first call compiles it (ninja and nvcc)."""
    from peft.tuners.boft.layer import get_fbd_cuda

    return get_fbd_cuda() is not None


@register
class BOFT(PerLayerPeftMethod):
    """Butterfly OFT: the input rotation R is a product of m block-diagonal Cayley rotations interleaved
    with butterfly permutations, so few parameters mix all of d_in; a trained scale per output row
    (boft_s, length d_out, init 1) multiplies the result. W' = diag(s) W R.

    peft stores each b x b block as a full matrix (it takes the skew part), so a block costs b^2
    parameters, not b(b-1)/2. peft builds m > 1 only with its CUDA extension (fbd_cuda, compiled on first
    use) and otherwise silently falls back to m = 1; this method refuses m > 1 where the extension is missing."""

    name = "boft"
    summary = "butterfly-factored orthogonal rotation of each target layer's input plus an output scale, and the head"
    paper = ("Liu et al. 2023, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization, "
             "arXiv 2311.06243")
    formula = "m*b*d_in + d_out per target layer (b = block_size, m = n_butterfly_factor) + head"
    mergeable = True
    identity_at_init = True  # zero blocks give R = I, and the scales start at 1
    default_lr = 1e-3
    hparams = (
        HParam("block_size", int, 4, "side b of each rotation block; must divide every target layer's d_in",
               low=2, size=True),
        HParam("n_butterfly_factor", int, 1,
               "m, the number of butterfly factors (1: OFT with an output scale); m > 1 needs peft's CUDA "
               "extension, d_in divisible by b*2^(m-1), and b and d_in/b even", low=1),
        TARGET_MODULES,
        HParam("dropout", float, 0.0, "probability of replacing a rotation block by I during training "
               "(peft's multiplicative boft_dropout)", low=0.0, high=1.0),
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> BOFTConfig:
        return BOFTConfig(
            task_type=peft_task_type(task),
            boft_block_size=hp["block_size"],
            boft_block_num=0,  # peft requires exactly one of block size and block count
            boft_n_butterfly_factor=hp["n_butterfly_factor"],
            boft_dropout=hp["dropout"],
            target_modules=targets_of(model, hp),
            modules_to_save=list(task.head_modules),
        )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        if hp["n_butterfly_factor"] > 1 and not _fbd_cuda_available():
            return [
                f"n_butterfly_factor {hp['n_butterfly_factor']} needs peft's CUDA extension fbd_cuda, which did not "
                "load here (it needs CUDA, nvcc and ninja); peft would silently use 1. Use n_butterfly_factor 1"
            ]
        return super()._problems(model, hp, task)

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        return hp["n_butterfly_factor"] * hp["block_size"] * d_in + d_out

    def _layer_problem(self, hp: dict, d_in: int, d_out: int) -> str | None:
        b, m = hp["block_size"], hp["n_butterfly_factor"]
        if d_in % b:
            return f"block_size {b} does not divide d_in {d_in}"
        if m > 1 and (d_in % (b * 2 ** (m - 1)) or b % 2 or (d_in // b) % 2):
            return (f"n_butterfly_factor {m} with block_size {b} needs d_in divisible by {b * 2 ** (m - 1)} "
                    f"and an even block size and block count; d_in is {d_in}")
        return None

    def _size_range(self, hp: dict, shapes: list[Shape]) -> range:
        return _block_sizes(shapes)


@register
class HRA(PerLayerPeftMethod):
    """Householder reflection adaptation: W' = W H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2, one trained
    u_i (length d_in) per reflection. peft starts the u_i in equal pairs, so the product is I at init;
    that needs an even r (peft falls back to random reflections for odd r), so odd r is refused here.
    peft's apply_GS option (Gram-Schmidt on the u_i) is not exposed: applied to those equal pairs it
    orthogonalises rounding noise, so the model would not start at W."""

    name = "hra"
    summary = "a product of r trained Householder reflections on each target layer's input, and the head"
    paper = ("Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder "
             "Reflection Adaptation, arXiv 2405.17484")
    formula = "r*d_in per target layer + head"
    mergeable = True
    identity_at_init = True  # reflections start in equal pairs, H H = I
    default_lr = 1e-3
    hparams = (
        HParam("r", int, 8, "number of reflections; even, so that they start in cancelling pairs", low=2, size=True),
        TARGET_MODULES,
    )

    def peft_config(self, model: nn.Module, hp: dict, task: TaskInfo) -> HRAConfig:
        return HRAConfig(
            task_type=peft_task_type(task), r=hp["r"], target_modules=targets_of(model, hp),
            modules_to_save=list(task.head_modules),
        )

    def _problems(self, model: nn.Module, hp: dict, task: TaskInfo) -> list[str]:
        if hp["r"] % 2:
            return [f"r must be even (got {hp['r']}): peft starts HRA at W only by pairing equal reflections"]
        return super()._problems(model, hp, task)

    def _layer_count(self, hp: dict, d_in: int, d_out: int) -> int:
        return hp["r"] * d_in

    def _size_range(self, hp: dict, shapes: list[Shape]) -> range:
        return range(2, max((d_in for _, d_in, _ in shapes), default=2) + 1, 2)
