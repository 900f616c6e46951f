"""`peftlab pretrain`: the decoder and the ViT peftlab builds from the data dir, as real processes
on real data, a few optimizer steps each; how a spec finds them and what happens before they exist."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import BACKBONE_STEPS
from test_sweep import PEFTLAB, ROOT
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.errors import UserError
from peftlab.workers import backbones
from peftlab.workers.models import load_causal_lm, load_image_classifier, resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
runner = CliRunner()


def test_built_backbones_load_as_models(built_backbones, data_dir):
    for name in backbones.BACKBONES:
        record = json.loads((built_backbones / name / backbones.STAMP).read_text())
        assert record["recipe"] == backbones.BACKBONES[name].recipe and record["steps"] == BACKBONE_STEPS
        # Pretraining did something: the loss of the last steps is below that of the first ones.
        assert record["last_loss"] < record["first_loss"], record
    decoder = json.loads((built_backbones / "peftlab-llama" / backbones.STAMP).read_text())
    assert set(decoder["corpus"]) == {"sst2", "banking77", "fomc"} and decoder["vocab"] == 4096

    model, tokenizer = load_causal_lm("peftlab-llama")
    assert model.config.model_type == "llama" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    text = "The Committee decided to raise the target range."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless

    vit, fmt = load_image_classifier("peftlab-vit", 2, data_dir)
    assert vit.config.model_type == "vit" and vit.classifier.out_features == 2  # a new head for the task
    assert (fmt.size, fmt.channels, tuple(fmt.mean), tuple(fmt.std)) == (28, 1, (0.5,), (0.5,))


def test_listing_and_missing_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_BACKBONES", str(tmp_path / "none"))
    listed = runner.invoke(app, ["pretrain"])
    assert listed.exit_code == 0 and "peftlab-llama" in listed.stdout and "peftlab-vit" in listed.stdout
    assert listed.stdout.count("no (") == 2
    with pytest.raises(UserError, match=r"run `peftlab pretrain peftlab-vit`"):
        resolve_model("peftlab-vit")
    spec = tmp_path / "vit.yaml"
    spec.write_text("name: v\nmodel: peftlab-vit\ntasks: [{type: image-classification, dataset: breastmnist}]\n"
                    "methods: {lora: {}}\n")
    refused = runner.invoke(app, ["validate", str(spec)])
    assert refused.exit_code == 2 and "model 'peftlab-vit' is built on this machine before use" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["pretrain", "peftlab-gpt5"], "unknown backbone 'peftlab-gpt5' (known: peftlab-llama, peftlab-vit)"),
    (["pretrain", "peftlab-vit", "--steps", "0"], "steps must be 1..100000, got 0"),
    (["pretrain", "peftlab-vit", "--steps", "1000000000"], "steps must be 1..100000"),
])
def test_bad_input_is_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_BACKBONES", str(tmp_path))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_failed_build_leaves_nothing_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """Data missing: one line, exit 2, no folder under the name or beside it; a good build survives."""
    import subprocess

    monkeypatch.setenv("PEFTLAB_BACKBONES", str(tmp_path / "built"))
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(tmp_path / "no-data"))
    (tmp_path / "no-data").mkdir()
    done = subprocess.run([*PEFTLAB, "pretrain", "peftlab-vit", "--steps", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "dataset 'mnist' not found" in done.stderr, done.stderr
    assert list((tmp_path / "built").iterdir()) == []


def test_same_recipe_same_weights(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("PEFTLAB_BACKBONES", str(tmp_path))
    weights = []
    for _ in range(2):
        backbones.build("peftlab-vit", steps=3, data_dir=data_dir)
        model, _ = load_image_classifier("peftlab-vit", 10, data_dir)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not list(tmp_path.glob(".*partial*"))
