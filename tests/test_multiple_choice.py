"""The multiple-choice task type on real BBQ: its splits keep question templates apart, its metrics
report ambiguous and disambiguated contexts apart, the seed methods lower its loss with the head
frozen, and its spec keys and refusals are its own."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peftlab.errors import SpecError, UserError
from peftlab.spec import parse_spec
from peftlab.workers.tasks import task_kind
from test_architectures_real import SEED_METHODS, lowers_the_loss, prepared

pytestmark = pytest.mark.slow
KIND = task_kind("multiple-choice")


def test_bbq_splits_keep_templates_apart_and_label_conditions(data_dir):
    data = KIND.load_data(KIND.spec_model(dataset="bbq"), data_dir)
    assert sum(data.sizes.values()) == 11_956  # the six categories of SOURCE.txt, every row once
    assert data.num_choices == 3 and set(data.train.labels) == {0, 1, 2}
    assert set(data.test.conditions) == {"ambiguous", "disambiguated"}
    # A template's variants share its question; carved by template, no question text straddles splits.
    questions = {split: {q for q in getattr(data, split).questions} for split in ("train", "validation", "test")}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["validation"]
    religion = KIND.load_data(KIND.spec_model(dataset="bbq", categories=["Religion"]), data_dir)
    assert sum(religion.sizes.values()) == 1200
    with pytest.raises(UserError, match=r"categories \['Gender'\] not under"):
        KIND.load_data(KIND.spec_model(dataset="bbq", categories=["Gender"]), data_dir)


def test_files_name_their_missing_column_and_bad_label_rows(tmp_path):
    rows = [{"context": "c", "question": "q?", "a": "x", "b": "y", "label": label} for label in (0, 1, 2, 1)]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = KIND.spec_model(dataset=str(path), choice_columns=["a", "b"])
    with pytest.raises(UserError, match=r"rows 3 \(counted from 1\)") as info:
        KIND.load_data(spec, None)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="missing choice column 'c'"):
        KIND.load_data(KIND.spec_model(dataset=str(path), choice_columns=["a", "c"]), None)


def _unit_scale_head(model) -> None:
    # BERT initialises the one-score head at std 0.02, so through a frozen head almost no gradient
    # reaches the backbone; a unit-scale random head (still frozen) lets the method's own weights learn.
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "classifier" in name and name.endswith("weight"):
            torch.nn.init.normal_(p.data, std=4.0)


def test_minilm_scores_each_answer_and_reports_each_context_condition(data_dir):
    spec = {"name": "t", "tasks": [{"type": "multiple-choice", "dataset": "bbq", "max_train_samples": 16,
                                    "max_eval_samples": 48, "retention_samples": 8}], "training": {"max_length": 64}}
    trial = prepared(spec, "lora", {"r": 4}, data_dir)
    assert trial.model.base_model.model.classifier.out_features == 1  # one score per answer
    batch = next(trial.task.train_batches(8, seed=0))
    assert batch["input_ids"].shape[:2] == (8, 3) and batch["labels"].shape == (8,)
    metrics = trial.task.evaluate(trial.model, 48, torch.device("cpu"), split="test")
    conditions = np.asarray(trial.task.conditions["test"])
    shares = {c: float((conditions == c).mean()) for c in ("ambiguous", "disambiguated")}
    assert 0 < shares["ambiguous"] < 1
    combined = sum(shares[c] * metrics[f"accuracy_{c}"] for c in shares)
    assert metrics["accuracy"] == pytest.approx(combined)
    assert trial.task.retention(trial.model, torch.device("cpu"))["drift"] == pytest.approx(0, abs=1e-6)  # untrained


@pytest.mark.parametrize("method", sorted(SEED_METHODS))
def test_seed_methods_on_a_bert_multiple_choice_model(method, tiny_bert_dir, data_dir):
    spec = {"name": "t", "model": str(tiny_bert_dir),
            "tasks": [{"type": "multiple-choice", "dataset": "bbq", "categories": ["Religion"],
                       "max_train_samples": 64, "max_eval_samples": 16}], "training": {"max_length": 32}}
    trial = prepared(spec, method, SEED_METHODS[method], data_dir)
    _unit_scale_head(trial.model)
    before, after = lowers_the_loss(trial, ("classifier",))
    # A random 32-wide BERT's pooled outputs differ little between a question's answers, so the loss
    # starts at ln 3 and moves slowly; with the head frozen, any fall is the method's own weights.
    assert after < before - 1e-6, f"{method} on BBQ multiple choice: {before:.6f} -> {after:.6f}"


def test_each_task_type_owns_its_keys():
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "t", "methods": {"lora": {}},
                    "tasks": [{"type": "multiple-choice", "dataset": "bbq", "exact_match": True},
                              {"type": "text-classification", "dataset": "sst2", "choice_columns": ["a", "b"]},
                              {"type": "regression", "dataset": "x.csv"}]})
    problems = info.value.problems
    assert "tasks[0].exact_match: unknown key" in problems
    assert "tasks[1].choice_columns: unknown key" in problems
    assert any(p.startswith("tasks[2]: type: unknown task type 'regression' (known: text-classification, "
                            "image-classification, causal-lm, multiple-choice)") for p in problems), problems
    spec = parse_spec({"name": "t", "methods": {"lora": {}}, "tasks": [{"type": "multiple-choice", "dataset": "bbq"}]})
    task = spec.tasks[0]
    assert (task.metric, task.domain, task.choice_columns) == ("accuracy", "bias/question-answering", ["ans0", "ans1", "ans2"])
    assert spec.model_dump()["tasks"][0]["choice_columns"] == ["ans0", "ans1", "ans2"]  # in the stored spec and hash
    with pytest.raises(SpecError, match=r"validation/accuracy_ambiguous' is not reported .*one of validation/accuracy, "
                                        r"validation/loss"):
        parse_spec({"name": "t", "methods": {"lora": {}}, "search": {"metric": "validation/accuracy_ambiguous"},
                    "tasks": [{"type": "multiple-choice", "dataset": "bbq"}]})


def test_validate_refuses_prompt_tuning_on_multiple_choice_in_one_line(tmp_path, data_dir):
    from typer.testing import CliRunner

    from peftlab.cli import app

    spec = tmp_path / "mc.yaml"
    spec.write_text("name: mc\ntasks: [{type: multiple-choice, dataset: bbq, categories: [Religion]}]\n"
                    "methods: {lora: {}, prompt_tuning: {}}\n")
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "prompt_tuning" in line]
    assert len(lines) == 1 and "which multiple-choice tasks do not offer" in lines[0], result.output
    assert "lora" in lines[0].split("methods that run there:")[1]


def test_predict_writes_each_questions_chosen_answer(tmp_path, tiny_bert_dir):
    from peftlab.spec import TrainingSpec

    path = tmp_path / "quiz.jsonl"
    path.write_text('{"context": "The sky is blue.", "question": "What colour is the sky?", "a": "blue", "b": "red"}\n'
                    '{"context": "Grass is green.", "question": "What colour is grass?", "a": "pink", "b": "green"}\n')
    spec = KIND.spec_model(dataset=str(path), choice_columns=["a", "b"])
    model, tokenizer = KIND.load_model(str(tiny_bert_dir), None, None)
    rows = KIND.predict(model, tokenizer, None, spec, TrainingSpec(), KIND.prediction_inputs(spec, path))
    assert [r["row"] for r in rows] == [1, 2]
    for row, choices in zip(rows, (["blue", "red"], ["pink", "green"]), strict=True):
        assert row["answer"] == choices[row["prediction"]] and 0.5 <= row["probability"] <= 1
