"""The CIFAR-10 ResNets of He et al. (2016, section 4.2): ResNet-20/32/56 and their loaders.

Module names match the published akamaster checkpoints, so their weights load strictly.

Architecture (depth = 6n + 2): a 3x3 conv to 16 channels, then three stages of n basic
blocks at 16, 32 and 64 channels (the first block of stages 2 and 3 halves the resolution),
a global average pool and a `linear` head. A basic block is conv-BN-ReLU-conv-BN plus the
shortcut, then ReLU. Shortcuts are parameter-free ("option A"): where the shape changes the
input is subsampled with stride 2 and zero channels are added on both sides, which keeps
the published parameter counts (1x1 projections would add 2,752).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError

# The checkpoints were trained on inputs normalised with the ImageNet statistics, not
# CIFAR-10's own; other constants cost a few points of accuracy silently.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

STAGE_WIDTHS = (16, 32, 64)
CHECKPOINT_DIR = Path("checkpoints") / "resnet_cifar10"
CHECKPOINT_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    56: "resnet56-4bfd9763.th",
}
CHECKPOINT_ORIGIN = "https://github.com/akamaster/pytorch_resnet_cifar10 (pretrained_models/)"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or subsample-and-zero-pad) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra_channels // 2
        # F.pad pads from the last dimension backwards: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n blocks, average pool, `linear`."""

    default_target_modules = ("conv1", "conv2")
    """What LoRA adapts by default: every 3x3 conv (the stem and both convs of each block)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 56, ...), got {depth}")
        if num_classes < 1:
            raise UserError(f"num_classes must be at least 1, got {num_classes}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        for index, width in enumerate(STAGE_WIDTHS):
            first_stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_channels, width, first_stride)]
            stage += [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            in_channels = width
        self.linear = new_head(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    @property
    def feature_dim(self) -> int:
        return self.linear.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 64-dimensional representation the head sees."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight)
    return head


def checkpoint_path(depth: int, data_dir: Path | str) -> Path:
    """The CIFAR-10 checkpoint for `depth` under `<data_dir>/checkpoints/resnet_cifar10/`."""
    if depth not in CHECKPOINT_FILES:
        raise UserError(f"no pretrained CIFAR-10 ResNet-{depth}; "
                        f"available depths: {', '.join(map(str, CHECKPOINT_FILES))}")
    path = Path(data_dir) / CHECKPOINT_DIR / CHECKPOINT_FILES[depth]
    if not path.is_file():
        raise UserError(f"ResNet-{depth} checkpoint not found at {path}; "
                        f"download {CHECKPOINT_FILES[depth]} from {CHECKPOINT_ORIGIN}")
    return path


def resnet_cifar(depth: int, *, pretrained_path: Path | None, num_classes: int) -> nn.Module:
    """A ResNetCifar, with CIFAR-10 weights from `pretrained_path` when given.

    With weights and num_classes != 10 the backbone is kept and `linear` is replaced by a
    freshly initialised head of the right size.
    """
    if pretrained_path is None:
        return ResNetCifar(depth, num_classes)
    path = Path(pretrained_path)
    if not path.is_file():
        raise UserError(f"ResNet-{depth} checkpoint not found at {path}")
    model = ResNetCifar(depth, 10)
    # The files come from DataParallel (keys prefixed `module.`) and predate
    # num_batches_tracked; a plain dict without _metadata lets BatchNorm fill that in as 0.
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise UserError(f"{path.name} is not a {{'state_dict': ...}} checkpoint")
    state = {key.removeprefix("module."): value for key, value in saved["state_dict"].items()}
    expected = {key: value.shape for key, value in model.state_dict().items()
                if not key.endswith("num_batches_tracked")}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    misshaped = [key for key in expected.keys() & state.keys() if state[key].shape != expected[key]]
    if missing or unexpected or misshaped:
        raise UserError(f"{path.name} does not fit ResNet-{depth}: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected and {len(misshaped)} mis-shaped tensors; "
                        f"is it a CIFAR-10 ResNet-{depth} checkpoint?")
    model.load_state_dict(state, strict=True)
    if num_classes != 10:
        model.linear = new_head(model.feature_dim, num_classes)
    return model


def preprocess(images: torch.Tensor | Sequence) -> torch.Tensor:
    """uint8 images -> a normalised float batch (N, 3, H, W) for ResNetCifar.

    Takes a uint8 tensor, channels first ((N, 3, H, W) or (3, H, W), as torchvision's
    `pil_to_tensor` gives), or a list of PIL images (converted to RGB).
    """
    if isinstance(images, torch.Tensor):
        batch = images
    else:
        if len(images) == 0:
            raise UserError("preprocess needs at least one image")
        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if batch.dtype != torch.uint8:
        raise UserError(f"preprocess expects uint8 images, got {batch.dtype}")
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise UserError("preprocess expects (N, 3, H, W) or (3, H, W) images, "
                        f"got {tuple(batch.shape)}")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std
