"""Every registered method really trains the real MiniLM on real SST-2 sentences.

90 steps of the project's own training loop on a small fixed subset (64 sentences, cut to 16
tokens, batches of 4, so each method takes seconds) must bring the training loss below where
it started; this catches methods that are wired but learn nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch

from peftlab.workers.data import load_text_classification
from peftlab.workers.methods import TaskInfo, all_methods, get_method
from peftlab.workers.models import head_modules, load_classifier
from peftlab.workers.tasks.text_classification import TextClassificationTask
from peftlab.workers.train import LoopSettings, train

STEPS, WINDOW, BATCH, TOKENS = 90, 10, 4, 16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_text_classification("sst2", max_train_samples=64, max_eval_samples=16, data_dir=data_dir)


@pytest.fixture(scope="module")
def minilm(sst2):
    """MiniLM with a seeded fresh head, loaded once; each test adapts its own copy."""
    torch.manual_seed(0)
    return load_classifier("minilm", sst2.num_labels)


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_training_lowers_the_loss_on_minilm_and_sst2(name, sst2, minilm):
    torch.manual_seed(0)
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    method = get_method(name)
    model = method.apply(model, {}, TaskInfo("text-classification", sst2.num_labels, head_modules(model)))
    task = TextClassificationTask(sst2, tokenizer, max_length=TOKENS)
    windows: list[float] = []
    settings = LoopSettings(max_steps=STEPS, batch_size=BATCH, eval_batch_size=16, eval_every=WINDOW,
                            warmup_ratio=0.06, max_grad_norm=1.0, lr=method.default_lr, weight_decay=0.0,
                            log_every=WINDOW)
    train(model, task, settings, seed=0, device=torch.device("cpu"),
          report=lambda record: windows.append(record.train_loss),
          after_step=lambda step: method.on_step(model, step, STEPS))
    # Mean training loss over the first and the last 10 steps, on the same 64 sentences.
    assert windows[-1] < windows[0], f"{name}: loss {windows[0]:.4f} -> {windows[-1]:.4f} ({windows})"
