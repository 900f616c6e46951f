"""The seed methods in real trials on the other architectures: a ViT (built from a config) on real
BreastMNIST images and a Llama-style decoder on real SST-2 sentences as instruction pairs, through the trial's own
preparation (task type, model loading, head, method) and training loop.

Each trial's loss on its 64 training examples, in eval mode, must fall after 30 steps while the new
classification head stays frozen at its initialisation (a causal LM has no new head), so only the
method's own parameters can lower it.
"""
from __future__ import annotations

import pytest
import torch

from peftlab.spec import parse_spec
from peftlab.workers.train import LoopSettings, train
from peftlab.workers.trial import TrialContext, prepare_trial, reshaping_of
from test_methods_real import freeze

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 30
SEED_METHODS = {
    "lora": {"r": 4}, "dora": {"r": 4}, "bora": {"r": 4}, "spectral_add": {"r": 4}, "spectral_rot": {"r": 4},
    "ether": {"n_blocks": 4}, "ether_plus": {"n_blocks": 4}, "bone": {"block_size": 8}, "ia3": {},
    "houlsby": {"bottleneck": 8}, "adaptformer": {"bottleneck": 8, "scale": 1.0},
}
"""Sized for the 32-wide tiny models (bone's blocks must divide every target layer)."""
DATA_DRIVEN = {"gps": {"k": 2, "calibration_batches": 4}, "spt": {"params": 1000, "r": 2, "calibration_batches": 4},
               "light_peft": {"r": 4, "estimation_steps": 10}}
"""The methods that calibrate on the training batches or prune while training, sized for the same models."""
VIT_METHODS = {**SEED_METHODS, **DATA_DRIVEN, "vpt": {"num_tokens": 4}, "vpt-deep": {"num_tokens": 4, "deep": True}}
"""The seed methods plus those made for ViTs alone (VPT needs patch tokens); "name-variant" ids run `name`."""
DECODER_METHODS = {**SEED_METHODS, **DATA_DRIVEN, "prompt_tuning": {"num_virtual_tokens": 4},
                   "peft_debias": {"r": 4, "debias_steps": 10, "debias_batch_size": 8}}
"""On the decoder too: prompt tuning and PEFTDebias (its first stage under next-token loss)."""
LR = {"ether": 1e-2, "ether_plus": 1e-2, "ia3": 3e-2, "houlsby": 1e-2, "adaptformer": 1e-2, "bone": 1e-2, "vpt": 1e-2}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(config).save_pretrained(path)
    return path


def prepared(spec: dict, method: str, hparams: dict, data_dir):
    parsed = parse_spec({**spec, "methods": {method: hparams}})
    task = parsed.tasks[0]
    context = TrialContext("t", parsed.model_for(task), task, parsed.training, "unused", str(data_dir), 1, 0)
    return prepare_trial({"method": method, method: {**hparams, "lr": LR.get(method, 5e-3)}, "seed": 0}, context)


@torch.no_grad()
def loss_on(model, batch) -> float:
    """The mean loss over the batch's examples, in eval mode, 16 at a time (a decoder's logits over
    its vocabulary for 64 examples at once would be hundreds of MiB)."""
    model.eval()
    n = len(batch["labels"])
    parts = [{k: v[i:i + 16] for k, v in batch.items()} for i in range(0, n, 16)]
    if batch["labels"].dim() == 1:  # one label per example: the mean of the parts' means, weighted
        return sum(float(model(**part).loss) * len(part["labels"]) for part in parts) / n
    counted = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]  # next-token positions
    return sum(float(model(**part).loss) * c for part, c in zip(parts, counted, strict=True)) / sum(counted)


def lowers_the_loss(trial, head: tuple[str, ...], batch_size: int = 16) -> tuple[float, float]:
    if head:
        assert freeze(trial.model, head) > 0
    batch = next(trial.task.train_batches(64, seed=123))  # all 64 training examples
    before = loss_on(trial.model, batch)
    settings = LoopSettings(max_steps=STEPS, batch_size=batch_size, eval_batch_size=64, eval_every=STEPS, warmup_ratio=0.0,
                            max_grad_norm=1.0, lr=trial.hparams["lr"], weight_decay=0.0)
    train(trial.model, trial.task, settings, seed=0, device=trial.device,
          after_step=lambda step: trial.method.on_step(trial.model, step, STEPS),
          reshaping=reshaping_of(trial.method, trial.model, STEPS))
    return before, loss_on(trial.model, batch)


@pytest.mark.parametrize("variant", sorted(VIT_METHODS))
def test_on_a_vit_with_real_images(variant, vit_dir, data_dir):
    spec = {"name": "t", "model": str(vit_dir),
            "tasks": [{"type": "image-classification", "dataset": "breastmnist", "max_train_samples": 64,
                       "max_eval_samples": 16}]}
    method = variant.split("-")[0]
    trial = prepared(spec, method, VIT_METHODS[variant], data_dir)
    before, after = lowers_the_loss(trial, ("classifier",))
    assert after < before - 1e-4, f"{variant} on a ViT: {before:.5f} -> {after:.5f}"


@pytest.mark.parametrize("method", sorted(DECODER_METHODS))
def test_on_a_llama_style_decoder(method, tiny_llama_dir, data_dir):
    # Real SST-2 sentences as instructions: the sentence and the question, the label's name as the answer.
    spec = {"name": "t", "model": str(tiny_llama_dir),
            "tasks": [{"type": "causal-lm", "dataset": "sst2", "max_train_samples": 64,
                       "max_eval_samples": 16, "retention": False}], "training": {"max_length": 48}}
    trial = prepared(spec, method, DECODER_METHODS[method], data_dir)
    # Batches of 8: a step's cost is the LM head over MiniLM's 30,522-token vocabulary at each position.
    before, after = lowers_the_loss(trial, (), batch_size=8)
    assert after < before - 1e-4, f"{method} on a Llama-style decoder: {before:.5f} -> {after:.5f}"
