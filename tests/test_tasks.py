"""Task types: causal-LM loss masking, retention (drift, forgetting), image inputs and AUROC,
LoRA on convolutions and Conv1D, and a Hugging Face image classifier built from a config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import UserError
from peftlab.spec import parse_spec
from peftlab.workers.methods import TaskInfo, get_method
from peftlab.workers.models import load_causal_lm, load_classifier, load_image_classifier
from peftlab.workers.tasks import task_kind
from peftlab.workers.tasks.causal_lm import IGNORE, CausalLmTask, encode_pairs
from peftlab.workers.tasks.image_classification import InputFormat, auroc, to_model_input
from peftlab.workers.train import LoopSettings, count_parameters, train
from peftlab.workers.trial import TrialContext, prepare_trial


def _settings(steps: int, lr: float) -> LoopSettings:
    return LoopSettings(max_steps=steps, batch_size=16, eval_batch_size=64, eval_every=steps,
                        warmup_ratio=0.0, max_grad_norm=1.0, lr=lr, weight_decay=0.0)


def _trial(spec_data: dict, method: str, hparams: dict | None = None, data_dir: Path | None = None):
    spec = parse_spec(spec_data)
    task = spec.tasks[0]
    context = TrialContext("t", spec.model_for(task), task, spec.training, "unused",
                           str(data_dir) if data_dir else None, 1, 0)
    return prepare_trial({"method": method, method: hparams or {}, "seed": 0}, context)


# -- causal LM -------------------------------------------------------------------------------

def test_prompt_tokens_carry_no_label(tiny_gpt2_dir):
    _, tokenizer = load_causal_lm(str(tiny_gpt2_dir))
    prompts, responses = ["what is 2 plus 3 ? answer :", "hi"], ["5", "hello there friend"]
    batch = encode_pairs(tokenizer, prompts, responses, max_length=32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1  # + eos
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:n_prompt] == IGNORE).all()
        assert torch.equal(labels[n_prompt:n_prompt + n_response], ids[n_prompt:n_prompt + n_response])
        assert labels[n_prompt + n_response - 1] == tokenizer.eos_token_id
        assert (labels[n_prompt + n_response:] == IGNORE).all()  # padding
        assert batch["attention_mask"][i].sum() == n_prompt + n_response


def test_causal_lm_loss_is_the_response_tokens_only(tiny_gpt2_dir):
    """The model's loss equals cross-entropy over response positions, and does not move when the
    prompt's own next-token predictions are made arbitrarily worse."""
    model, tokenizer = load_causal_lm(str(tiny_gpt2_dir))
    model.eval()
    batch = encode_pairs(tokenizer, ["what is 2 plus 3 ? answer :"], ["5"], max_length=32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = model(**batch).loss
    labels = batch["labels"][0]
    response = (labels != IGNORE).nonzero().flatten()
    manual = F.cross_entropy(logits[0, response - 1], labels[response])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    everything = F.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:])
    assert abs(everything.item() - manual.item()) > 1e-3  # masking changed what is averaged


def _gpt2_spec(tiny_gpt2_dir, instructions_jsonl, **task) -> dict:
    return {"name": "t", "model": str(tiny_gpt2_dir),
            "tasks": [{"type": "causal-lm", "dataset": str(instructions_jsonl), "retention_samples": 32, **task}],
            "methods": {"lora": {}}, "training": {"max_steps": 20, "batch_size": 16, "max_length": 32}}


def test_forgetting_is_zero_untouched_and_positive_after_full_tuning(tiny_gpt2_dir, instructions_jsonl, data_dir):
    trial = _trial(_gpt2_spec(tiny_gpt2_dir, instructions_jsonl), "full", {"lr": 1e-2}, data_dir)
    assert trial.task.retention(trial.model, trial.device) == {"forgetting": pytest.approx(0.0, abs=1e-6)}
    train(trial.model, trial.task, _settings(20, 1e-2), seed=0, device=trial.device, report=lambda r: None)
    assert trial.task.retention(trial.model, trial.device)["forgetting"] > 0.01


def test_causal_lm_trains_with_lora_on_conv1d_and_reports_exact_match(tiny_gpt2_dir, instructions_jsonl, data_dir):
    spec = _gpt2_spec(tiny_gpt2_dir, instructions_jsonl, exact_match=True, max_new_tokens=3)
    trial = _trial(spec, "lora", {"r": 4}, data_dir)
    base, _ = load_causal_lm(str(tiny_gpt2_dir))
    info = TaskInfo("causal-lm", 0, ())
    assert trial.static.trainable_params == get_method("lora").expected_trainable(base, {"r": 4}, info) > 0
    result = train(trial.model, trial.task, _settings(4, 1e-3), seed=0, device=trial.device, report=lambda r: None)
    assert 0.0 <= result.metrics["exact_match"] <= 1.0
    assert result.metrics["perplexity"] == pytest.approx(torch.tensor(result.metrics["loss"]).exp().item(), rel=1e-5)


def test_exact_match_counts_greedy_answers(tiny_gpt2_dir, tmp_path):
    """Train the answer in for one prompt: greedy decoding then reproduces it exactly."""
    model, tokenizer = load_causal_lm(str(tiny_gpt2_dir))
    from peftlab.workers.data import InstructionData

    data = InstructionData(["say the word"] * 8, ["movie"] * 8, ["say the word", "say the word"], ["movie", "plot"],
                           ["say the word"], ["movie"])
    task = CausalLmTask(data, tokenizer, 16, exact_match=True, max_new_tokens=2)
    for p in model.parameters():
        p.requires_grad_(True)
    train(model, task, _settings(40, 1e-2), seed=0, device=torch.device("cpu"), report=lambda r: None)
    assert task.evaluate(model, 8, torch.device("cpu"))["exact_match"] == 0.5  # "movie" right, "plot" not
    # `peftlab predict` on a causal-LM task writes the same greedy answers, one row per prompt.
    from peftlab.spec import TrainingSpec
    from peftlab.workers.tasks import task_kind

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say the word"}\n{"prompt": "say the word"}\n')
    kind = task_kind("causal-lm")
    spec = kind.spec_model(dataset="x.jsonl", max_new_tokens=2)
    rows = kind.predict(model, tokenizer, data, spec, TrainingSpec(), kind.prediction_inputs(spec, prompts))
    assert [(r["row"], r["prompt"], r["prediction"].strip()) for r in rows] == [
        (1, "say the word", "movie"), (2, "say the word", "movie")]


# -- retention of classifiers ------------------------------------------------------------------

def test_text_drift_is_zero_untouched_and_positive_after_training(tiny_bert_dir, sentiment_csv):
    trial = _trial({"name": "t", "model": str(tiny_bert_dir), "tasks": [{"dataset": str(sentiment_csv)}],
                    "methods": {"full": {}}}, "full", {"lr": 1e-3})
    assert trial.task.retention(trial.model, trial.device) == {"drift": pytest.approx(0.0, abs=1e-6)}
    train(trial.model, trial.task, _settings(15, 1e-3), seed=0, device=trial.device, report=lambda r: None)
    assert trial.task.retention(trial.model, trial.device)["drift"] > 1e-3


def test_image_drift_is_zero_for_a_linear_probe_and_positive_for_lora(data_dir):
    spec = {"name": "t", "tasks": [{"type": "image-classification", "dataset": "breastmnist",
                                    "max_train_samples": 64, "max_eval_samples": 32}], "methods": {"lora": {}}}
    probe = _trial(spec, "linear_probe", {}, data_dir)
    train(probe.model, probe.task, _settings(5, 1e-2), seed=0, device=probe.device, report=lambda r: None)
    # The frozen backbone, batch-norm statistics included, must not move.
    assert probe.task.retention(probe.model, probe.device)["drift"] == pytest.approx(0.0, abs=1e-6)
    lora = _trial(spec, "lora", {"r": 2}, data_dir)
    train(lora.model, lora.task, _settings(5, 1e-2), seed=0, device=lora.device, report=lambda r: None)
    assert lora.task.retention(lora.model, lora.device)["drift"] > 1e-4


# -- images ----------------------------------------------------------------------------------------

def test_image_predictions_follow_the_model_and_bad_files_are_one_line(tmp_path, data_dir):
    import numpy as np

    from peftlab.errors import UserError
    from peftlab.spec import TrainingSpec
    from peftlab.workers.tasks import task_kind
    from peftlab.workers.tasks.image_classification import to_model_input

    spec = {"name": "t", "tasks": [{"type": "image-classification", "dataset": "breastmnist",
                                    "max_train_samples": 32, "max_eval_samples": 16}], "methods": {"lora": {}}}
    trial = _trial(spec, "linear_probe", {}, data_dir)
    kind = task_kind("image-classification")
    images = trial.task.data.test_images[:5, 0].numpy()
    np.savez(tmp_path / "images.npz", images=images)
    inputs = kind.prediction_inputs(None, tmp_path / "images.npz")
    rows = kind.predict(trial.model, trial.task.fmt, trial.task.data, None, TrainingSpec(eval_batch_size=2), inputs)
    with torch.no_grad():
        trial.model.eval()
        expected = trial.model(pixel_values=to_model_input(torch.from_numpy(images[:, None]), trial.task.fmt)).logits
    names = trial.task.data.label_names
    assert [r["prediction"] for r in rows] == [names[i] for i in expected.argmax(-1).tolist()]
    assert [r["row"] for r in rows] == [1, 2, 3, 4, 5] and all(0.5 <= r["probability"] <= 1 for r in rows)
    np.savez(tmp_path / "floats.npz", images=images.astype("float32"))
    np.savez(tmp_path / "other.npz", pixels=images)
    for name, message in (("floats.npz", "expected uint8"), ("other.npz", r"has no `images` array \(has: pixels\)"),
                          ("images.csv", "reads a .npz file")):
        with pytest.raises(UserError, match=message):
            kind.prediction_inputs(None, tmp_path / name)


def test_grey_images_are_resized_and_repeated():
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    images[:, :, :14] = 255
    fmt = InputFormat(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = to_model_input(images, fmt)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2])
    assert x[0, 0, 0, 0] == pytest.approx(1.0) and x[0, 0, -1, 0] == pytest.approx(-1.0)
    with pytest.raises(UserError, match="4 channels; the model takes 3"):
        to_model_input(torch.zeros(1, 4, 3, 3, dtype=torch.uint8), fmt)


def test_auroc_on_a_known_case():
    # Positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: pairs won 1+1+1 and 0+1+0.5 of 6.
    scores = torch.tensor([0.9, 0.4, 0.5, 0.1, 0.4])
    gold = torch.tensor([1, 1, 0, 0, 0])
    assert auroc(scores, gold) == pytest.approx(4.5 / 6)
    assert auroc(torch.tensor([0.2, 0.8]), torch.tensor([0, 1])) == 1.0


def test_landsat_cannot_feed_a_cifar_resnet(tmp_path, data_dir, monkeypatch):
    from peftlab.driver import preflight
    from peftlab.errors import SpecError

    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    spec = parse_spec({"name": "t", "tasks": [{"type": "image-classification", "dataset": "landsat"}],
                       "methods": {"lora": {}}})
    with pytest.raises(SpecError, match="4 channels; the model takes 3"):
        preflight(spec)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_on_resnet_convs_counts_what_it_trains(method, data_dir):
    model, _ = load_image_classifier("resnet20-cifar10", 2, data_dir)
    info = TaskInfo("image-classification", 2, ("net.linear",))
    expected = get_method(method).expected_trainable(model, {"r": 2}, info)
    adapted = get_method(method).apply(model, {"r": 2}, info)
    assert count_parameters(adapted)[0] == expected
    convs = [n for n, m in adapted.named_modules() if n.endswith((".conv1", ".conv2")) and hasattr(m, "lora_A")]
    assert len(convs) == 19  # the stem and two per block of ResNet-20's nine blocks


def test_methods_for_transformers_only_are_rejected_for_a_cnn(tmp_path, data_dir, monkeypatch):
    from typer.testing import CliRunner

    from peftlab.cli import app

    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\ntasks: [{type: image-classification, dataset: breastmnist}]\n"
                    "methods: {ia3: {}, houlsby: {}, lora: {}}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "methods.ia3: method ia3 has no default target_modules for LogitsClassifier" in lines[0]
    assert "methods.houlsby: method houlsby inserts adapters into transformer blocks" in lines[0]
    assert "methods.lora" not in lines[0]  # LoRA takes the ResNet's own default targets, its convs


def test_a_hugging_face_image_classifier_built_from_a_config(tmp_path, data_dir):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    spec = {"name": "t", "model": str(tmp_path / "vit"),
            "tasks": [{"type": "image-classification", "dataset": "breastmnist", "max_train_samples": 64,
                       "max_eval_samples": 32}], "methods": {"lora": {}}}
    trial = _trial(spec, "lora", {"r": 4}, data_dir)
    base, fmt = load_image_classifier(str(tmp_path / "vit"), 2, data_dir)
    assert fmt == InputFormat(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # no processor file: the config's size
    info = TaskInfo("image-classification", 2, ("classifier",))
    assert trial.static.trainable_params == get_method("lora").expected_trainable(base, {"r": 4}, info)
    result = train(trial.model, trial.task, _settings(4, 1e-3), seed=0, device=trial.device, report=lambda r: None)
    assert {"validation/auroc", "validation/accuracy", "validation/loss"} <= result.scores().keys()


def test_text_kind_loads_minilm_head(tiny_bert_dir):
    model, _ = load_classifier(str(tiny_bert_dir), 2)
    assert task_kind("text-classification").head_modules(model) == ("classifier",)
