"""Methods as plugins: two small packages built in a temporary folder and installed into the venv
with pip, one declaring a working method through the `peftlab.methods` entry-point group, one whose
module fails to import. A sweep from a spec uses the plugin method; the broken one is named by its
package in one line while every other method stays usable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from peftlab.store import ResultsStore, TrialStatus
from test_sweep import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLUGIN = '''
"""LN-tuning as a peftlab plugin: trains the LayerNorms' gains and biases (and the head)."""
from torch import nn

from peftlab.workers.methods import Method
from peftlab.workers.methods.base import in_head


def norms(model):
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


class LayerNormTuning(Method):
    name = "ln_tuning"
    summary = "LayerNorm gains and biases"
    paper = "Qi et al. 2022, Parameter-efficient tuning on layer normalization"
    formula = "2*d per LayerNorm + head"
    mergeable = False
    identity_at_init = True
    default_lr = 1e-3

    def _apply(self, model, hp, task):
        for name, parameter in model.named_parameters():
            parameter.requires_grad = in_head(name, task)
        for norm in norms(model):
            norm.requires_grad_(True)
        return model

    def _count(self, model, hp, task):
        return sum(p.numel() for norm in norms(model) for p in norm.parameters())
'''


def package(root: Path, name: str, module: str, source: str, entry: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / f"{module}.py").write_text(source)
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"

        [tool.setuptools]
        py-modules = ["{module}"]

        [project.entry-points."peftlab.methods"]
        {entry}
        """))
    return folder


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True, timeout=300)


@pytest.fixture
def installed_plugins(tmp_path):
    good = package(tmp_path, "peftlab-ln-tuning", "peftlab_ln_tuning", PLUGIN,
                   'ln_tuning = "peftlab_ln_tuning:LayerNormTuning"')
    broken = package(tmp_path, "peftlab-broken-plugin", "peftlab_broken_plugin",
                     "import a_module_that_is_not_installed\n", 'broken = "peftlab_broken_plugin:Method"')
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(good), str(broken))
    try:
        yield
    finally:
        pip("uninstall", "-y", "peftlab-ln-tuning", "peftlab-broken-plugin")


def test_a_plugin_method_runs_in_a_sweep_and_a_broken_one_is_named(installed_plugins, tmp_path, tiny_bert_dir,
                                                                   sentiment_csv):
    home = tmp_path / "runs"
    listed = run_cli("methods", "--format", "json", home=home)
    assert listed.returncode == 0, listed.stderr
    names = {m["name"] for m in json.loads(listed.stdout)}
    assert {"ln_tuning", "lora", "dora", "bitfit"} <= names and "broken" not in names
    warning = [line for line in listed.stderr.splitlines() if "broken" in line]
    assert len(warning) == 1 and "package 'peftlab-broken-plugin'" in warning[0]
    assert "ModuleNotFoundError" in warning[0]

    spec = {"name": "plugin", "model": str(tiny_bert_dir),
            "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 40}],
            "methods": {"ln_tuning": {"lr": 1.0e-2}},
            "search": {"algorithm": "grid", "scheduler": "fifo"}, "training": {"max_steps": 6, "batch_size": 8, "eval_every": 3}}
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(spec))
    refused = yaml.safe_load(path.read_text()) | {"name": "uses-broken", "methods": {"broken": {}}}
    refused_path = tmp_path / "broken.yaml"
    refused_path.write_text(yaml.safe_dump(refused))
    failed = run_cli("validate", str(refused_path), home=home)
    assert failed.returncode == 2
    line = failed.stderr.strip()
    assert "\n" not in line and "methods.broken" in line and "package 'peftlab-broken-plugin'" in line
    assert not (home / "results.db").exists()

    ran = run_cli("run", str(path), home=home)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    (trial,) = ResultsStore(f"sqlite:///{home / 'results.db'}", read_only=True).trials("plugin")
    assert trial.method == "ln_tuning" and trial.status is TrialStatus.COMPLETED and trial.steps == 6
    # Two LayerNorms per layer and the embeddings' (32 wide, 2 layers: gain and bias), and the 2-class head.
    assert trial.trainable_params == 5 * 2 * 32 + (32 * 2 + 2)
    assert trial.objective is not None and trial.test_objective is not None
    assert (home / "adapters" / "plugin" / trial.trial_id).is_dir() and trial.adapter_bytes > 0
    scored = run_cli("eval", "plugin", "--method", "ln_tuning", home=home)  # the adapter loads in a new process
    assert scored.returncode == 0, scored.stderr
    assert f"{trial.test_objective:.4f}" in scored.stdout
