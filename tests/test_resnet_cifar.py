"""The CIFAR-10 ResNet port: parameter counts from the architecture, strict loads of the
published checkpoints, and classification of 20 real CIFAR-10 test images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from peftlab.errors import UserError
from peftlab.workers.vision.resnet_cifar import (
    MEAN,
    STD,
    ResNetCifar,
    checkpoint_path,
    preprocess,
    resnet_cifar,
)

DEPTHS = (20, 32, 56)
# The fewest of the 20 sanity images each checkpoint must get right; an independent NumPy
# forward pass (SOURCE.txt) gets 20, 19 and 20.
MIN_CORRECT = {20: 19, 32: 19, 56: 19}


def expected_parameters(depth: int, num_classes: int = 10) -> int:
    """Trainable parameters of ResNet-(6n+2), counted by hand from the architecture."""
    n = (depth - 2) // 6

    def conv(c_in: int, c_out: int) -> int:
        return 3 * 3 * c_in * c_out  # 3x3, no bias

    def bn(c: int) -> int:
        return 2 * c  # weight and bias

    total = conv(3, 16) + bn(16)  # stem
    c_in = 16
    for width in (16, 32, 64):
        first = conv(c_in, width) + bn(width) + conv(width, width) + bn(width)
        rest = (n - 1) * 2 * (conv(width, width) + bn(width))
        total += first + rest  # option-A shortcuts have no parameters
        c_in = width
    return total + 64 * num_classes + num_classes  # linear head


def running_stats(depth: int) -> int:
    """Values in the BatchNorm running mean and variance (what a checkpoint adds to params)."""
    n = (depth - 2) // 6
    return 2 * (16 + sum(2 * n * width for width in (16, 32, 64)))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sanity_batch(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    folder = data_dir / "checkpoints" / "resnet_cifar10" / "sanity_cifar10_foolbox"
    files = sorted(folder.glob("cifar10_*.png"))
    assert len(files) == 20
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])  # last number = class
    return preprocess([Image.open(f) for f in files]), labels


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_count_matches_the_architecture(depth):
    assert count(ResNetCifar(depth)) == expected_parameters(depth)
    assert count(ResNetCifar(depth, num_classes=2)) == expected_parameters(depth, 2)


def test_parameter_counts_are_the_published_sizes():
    # He et al. (2016), table 6: 0.27M, 0.46M, 0.85M.
    sizes = {depth: round(expected_parameters(depth) / 1e6, 2) for depth in DEPTHS}
    assert sizes == {20: 0.27, 32: 0.46, 56: 0.85}


def test_bad_depth_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="6n \\+ 2"):
        ResNetCifar(21)
    with pytest.raises(UserError, match="available depths"):
        checkpoint_path(44, tmp_path)


def test_shapes_and_shortcuts():
    model = ResNetCifar(20).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 64)
    block = model.layer2[0]
    y = block.shortcut(torch.ones(1, 16, 32, 32))
    assert y.shape == (1, 32, 16, 16)
    # The 16 input channels sit in the middle; 8 zero channels on either side.
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert torch.all(y[:, 8:24] == 1)


@pytest.mark.parametrize("depth", DEPTHS)
def test_checkpoint_loads_strictly_and_classifies_sanity_images(data_dir, depth):
    path = checkpoint_path(depth, data_dir)
    model = resnet_cifar(depth, pretrained_path=path, num_classes=10).eval()
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    assert {k.removeprefix("module.") for k in saved} == {
        k for k in state if not k.endswith("num_batches_tracked")}
    for key, value in saved.items():
        assert torch.equal(state[key.removeprefix("module.")], value)
    values = sum(v.numel() for v in saved.values())
    assert values == expected_parameters(depth) + running_stats(depth)

    images, labels = sanity_batch(data_dir)
    with torch.no_grad():
        correct = int((model(images).argmax(dim=1) == labels).sum())
    assert correct >= MIN_CORRECT[depth], f"ResNet-{depth}: {correct}/20"


def test_new_head_keeps_the_backbone(data_dir):
    path = checkpoint_path(20, data_dir)
    reference = resnet_cifar(20, pretrained_path=path, num_classes=10)
    model = resnet_cifar(20, pretrained_path=path, num_classes=2)
    assert model.linear.weight.shape == (2, 64) and model.linear.bias.shape == (2,)
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("linear.")}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())
    assert count(model) == expected_parameters(20, num_classes=2)
    images, _ = sanity_batch(data_dir)
    with torch.no_grad():
        assert torch.equal(model.eval().features(images), reference.eval().features(images))
        assert model(images).shape == (20, 2)


def test_missing_checkpoint_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as caught:
        checkpoint_path(20, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "resnet20-12fca82f.th" in message and str(tmp_path) in message
    with pytest.raises(UserError, match="not found"):
        resnet_cifar(20, pretrained_path=tmp_path / "nope.th", num_classes=10)


def test_wrong_depth_checkpoint_is_a_user_error(data_dir):
    with pytest.raises(UserError, match="does not fit ResNet-20"):
        resnet_cifar(20, pretrained_path=checkpoint_path(32, data_dir), num_classes=10)


def test_preprocess_tensor_and_pil_agree():
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    from_tensor = preprocess(pixels)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    assert torch.allclose(preprocess(pil), from_tensor)
    assert preprocess(pixels[0]).shape == (1, 3, 32, 32)
    white = preprocess(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    for channel in range(3):
        assert white[0, channel, 0, 0].item() == pytest.approx((1 - MEAN[channel]) / STD[channel])
    with pytest.raises(UserError, match="uint8"):
        preprocess(pixels.float())
    with pytest.raises(UserError, match="N, 3, H, W"):
        preprocess(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["lora", "bitfit"])
def test_a_reloaded_adapter_keeps_the_batch_norm_statistics_training_moved(data_dir, tmp_path, name):
    # Batch norms with trainable parameters (bitfit's) update their running statistics in training;
    # the saved adapter carries them, so the reloaded model scores as the trained one did.
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.methods.base import NORM_STATISTICS
    from peftlab.workers.models import image_head_modules, load_image_classifier

    torch.manual_seed(0)
    base, _ = load_image_classifier("resnet20-cifar10", 2, data_dir)
    method = get_method(name)
    task = TaskInfo("image-classification", 2, image_head_modules(base))
    model = method.apply(base, {}, task).train()
    with torch.no_grad():
        for _ in range(3):
            model(pixel_values=torch.randn(8, 3, 32, 32) * 2 + 1)
    method.save(model, tmp_path / "adapter")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        trained = model.eval()(pixel_values=images).logits

    def reloaded() -> torch.Tensor:
        torch.manual_seed(0)
        fresh, _ = load_image_classifier("resnet20-cifar10", 2, data_dir)
        with torch.no_grad():
            return method.load(fresh, tmp_path / "adapter")(pixel_values=images).logits

    assert torch.allclose(reloaded(), trained, atol=1e-5)
    if name == "lora":  # a frozen backbone's norms stay in eval mode: nothing moved, nothing to carry
        assert not (tmp_path / "adapter" / NORM_STATISTICS).exists()
        return
    (tmp_path / "adapter" / NORM_STATISTICS).unlink()
    assert not torch.allclose(reloaded(), trained, atol=1e-3)  # without them the scores differ
