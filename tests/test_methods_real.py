"""Every registered method really trains the real MiniLM on real SST-2 sentences.

90 steps of the project's own training loop on a small fixed subset (64 sentences, cut to 16
tokens, batches of 4, so each method takes seconds) must lower the loss on those 64 sentences,
measured before and after in eval mode (no dropout, no sampling: a deterministic number). The
new classification head stays frozen at its initialisation, so only the method's own parameters
can lower it: a method wired so that its parameters do not reach the output leaves the loss
exactly where it was. Linear probing, whose parameters are the head, keeps its head trainable.
"""
from __future__ import annotations

import copy

import pytest
import torch

from peftlab.workers.data import SplitOptions, TextClassificationData, load_text_classification
from peftlab.workers.methods import Calibration, TaskInfo, all_methods, get_method
from peftlab.workers.models import head_modules, load_classifier
from peftlab.workers.tasks.text_classification import TextClassificationTask
from peftlab.workers.train import LoopSettings, train
from peftlab.workers.trial import reshaping_of

STEPS, WINDOW, BATCH, TOKENS = 90, 10, 4, 16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_text_classification("sst2", options=SplitOptions(max_train_samples=64, max_eval_samples=16),
                                    data_dir=data_dir)


@pytest.fixture(scope="module")
def minilm(sst2):
    """MiniLM with a seeded fresh head, loaded once; each test adapts its own copy."""
    torch.manual_seed(0)
    return load_classifier("minilm", sst2.num_labels)


SHORTER = {"peft_debias": {"debias_steps": 30, "debias_batch_size": 8}}
"""A first stage as long as this test's own training, not the default 200 steps."""
HEAD_ONLY = {"linear_probe"}
"""Methods whose trainable parameters are the head itself."""
LEAST_DROP = 1e-5
"""The loss must fall by more than this; measured drops range from 1e-4 (prompt tuning, LoHa) up."""


def freeze(model: torch.nn.Module, head: tuple[str, ...]) -> int:
    """Freeze every trainable parameter inside the head (peft's trained copy of it too); how many."""
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and set(name.split(".")) & set(head)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


TEXT_METHODS = sorted(n for n, m in all_methods().items() if m.needs <= TaskInfo("text-classification", 2, ()).offers)
"""Every method text classification can host (VPT, made for image patch tokens, runs in test_architectures_real)."""


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_training_lowers_the_loss_on_minilm_and_sst2(name, sst2, minilm):
    torch.manual_seed(0)
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    method = get_method(name)
    head = head_modules(model)
    model = method.apply(model, SHORTER.get(name, {}), TaskInfo("text-classification", sst2.num_labels, head))
    if method.calibrates:  # a gradient pass or a first stage, on batches of the same sentences
        stream = TextClassificationTask(sst2, tokenizer, max_length=TOKENS).train_batches(BATCH, seed=1)
        method.calibrate(model, Calibration(batches=stream, texts=list(sst2.train_texts), processor=tokenizer,
                                            model_name="minilm", max_length=TOKENS))
    if name not in HEAD_ONLY:
        assert freeze(model, head) > 0, f"{name}: the head was not trainable, so nothing was frozen"
    assert any(p.requires_grad for p in model.parameters()), f"{name}: nothing left to train"
    # Training and measuring on the same 64 sentences.
    seen = TextClassificationData(sst2.train_texts, sst2.train_labels, sst2.train_texts, sst2.train_labels,
                                  sst2.train_texts, sst2.train_labels, sst2.label_names)
    task = TextClassificationTask(seen, tokenizer, max_length=TOKENS)
    device = torch.device("cpu")
    before = task.evaluate(model, 64, device)["loss"]
    settings = LoopSettings(max_steps=STEPS, batch_size=BATCH, eval_batch_size=64, eval_every=STEPS,
                            warmup_ratio=0.06, max_grad_norm=1.0, lr=method.default_lr, weight_decay=0.0,
                            log_every=WINDOW)
    train(model, task, settings, seed=0, device=device, report=lambda record: None,
          after_step=lambda step: method.on_step(model, step, STEPS), reshaping=reshaping_of(method, model, STEPS))
    after = task.evaluate(model, 64, device)["loss"]
    assert before - after > LEAST_DROP, f"{name}: loss on the training sentences {before:.5f} -> {after:.5f}"
