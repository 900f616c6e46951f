"""The CLI's contract: bad input gives one line, exit 2, no Ray and nothing written."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftlab.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def good_spec(csv: Path, model: Path) -> dict:
    return {
        "name": "bad-input",
        "model": str(model),
        "tasks": [{"dataset": str(csv)}],
        "methods": {"lora": {"r": [2, 4], "lr": {"loguniform": [1.0e-4, 1.0e-2]}}, "bitfit": {}},
        "search": {"num_samples": 2},
        "training": {"max_steps": 4, "eval_every": 2},
    }


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def breakages(tmp: Path) -> dict:
    """Each case: (how to break a good spec, text the error must contain)."""
    return {
        "invalid yaml": ("name: x\nmethods: {lora: {r: [4, 8}\n", "invalid YAML at line"),
        "unknown key": (lambda s: s["training"].update(max_stepz=3), "training.max_stepz: unknown key"),
        "unknown method": (lambda s: s["methods"].update(loraa={}), "methods.loraa: unknown method 'loraa'"),
        "inverted range": (lambda s: s["methods"]["lora"].update(lr={"loguniform": [1.0e-2, 1.0e-4]}),
                           "methods.lora.lr: empty or inverted range"),
        "foreign hyperparameter": (lambda s: s["methods"]["bitfit"].update(r=8), "methods.bitfit.r: 'r' belongs to"),
        "missing dataset file": (lambda s: s["tasks"][0].update(dataset=str(tmp / "nope.csv")),
                                 "tasks[0].dataset: dataset file not found"),
        "missing text column": (lambda s: s["tasks"][0].update(text_column="sentence"),
                                "missing text column 'sentence'"),
        "missing label column": (lambda s: s["tasks"][0].update(dataset=str(write_csv(tmp / "nolabel.csv", "text,y", ["a,1", "b,0"] * 10))),
                                 "missing label column 'label'"),
        "float labels": (lambda s: s["tasks"][0].update(dataset=str(write_csv(tmp / "float.csv", "text,label", ["a,0.5", "b,1.5"] * 10))),
                         "labels must be integers or strings"),
        "unknown model path": (lambda s: s.update(model=str(tmp / "no-model")), "model: model path not found"),
        "max_concurrent < 1": (lambda s: s["search"].update(max_concurrent=0), "search.max_concurrent: must be at least 1"),
        "method cannot apply": (lambda s: s["methods"]["lora"].update(target_modules=["q_proj"]), "methods.lora:"),
        "tab-separated .csv": (lambda s: s["tasks"][0].update(dataset=str(write_csv(tmp / "tabs.csv", "text\tlabel", ["a b\t1", "c d\t0"] * 10))),
                               "looks tab-separated; name it .tsv"),
        "latin-1 file": (lambda s: ((tmp / "latin1.csv").write_bytes("text,label\ncaf\u00e9 ok,1\nbad,0\n".encode("latin-1")),
                                    s["tasks"][0].update(dataset=str(tmp / "latin1.csv"))),
                         "is not UTF-8 text (byte 0xe9 at offset"),
        "empty text cell": (lambda s: s["tasks"][0].update(dataset=str(write_csv(tmp / "holes.csv", "text,label", ["a,1", ",0", "b,1", " ,0"] * 5))),
                            "text column 'text' has 10 empty values (data rows 2, 4, 6, 8, 10, ..., counted from 1)"),
        "model alias typo": (lambda s: s.update(model="minlm"), "model: unknown model 'minlm': did you mean minilm?"),
        "task name as a path": (lambda s: s["tasks"][0].update(name="../../../../tmp/x"),
                                "tasks[0].name: String should match pattern"),
        "absurd num_samples": (lambda s: s["search"].update(num_samples=1_000_000_000),
                               "search.num_samples: Input should be less than or equal to 10000"),
        "absurd seeds": (lambda s: s.update(seeds=1_000_000_000), "seeds: give a number of seeds from 1 to 1000"),
        "grid too large": (lambda s: (s["search"].update(algorithm="grid"),
                                      s["methods"]["lora"].update(r=list(range(1, 101)), lr=[1e-3 * i for i in range(1, 102)])),
                           "tasks[0]: a grid of 10,101 configurations x 2 repeats x 1 seeds is 20,202 trials"),
        "fp16 on CPU": (lambda s: s["training"].update(precision="fp16"), "training.precision: fp16 needs a GPU"),
        "quantized non-LoRA method": (lambda s: s.update(quantization={"bits": 4}, resources={"gpus_per_trial": 1}),
                                      "quantization: trains LoRA-family methods only (dora, lora) on the frozen "
                                      "quantized base, not bitfit"),
        # This machine has no CUDA GPU (nor, in CI, bitsandbytes): validate says so before anything runs.
        "quantization this machine cannot run": (
            lambda s: (s.update(quantization={"bits": 4}, resources={"gpus_per_trial": 1}), s["methods"].pop("bitfit")),
            "quantization: bitsandbytes"),
        "fractional GPUs above one": (lambda s: s.update(resources={"gpus_per_trial": 1.5}),
                                      "resources.gpus_per_trial: above 1 must be a whole number of GPUs"),
        "accumulation beyond the batch": (lambda s: s["training"].update(batch_size=4, gradient_accumulation_steps=8),
                                          "training.batch_size: 4 is below workers_per_trial x gradient_accumulation_steps"),
        "absurd retries": (lambda s: s["search"].update(max_failures=1000),
                           "search.max_failures: Input should be less than or equal to 10"),
        "negative checkpoint interval": (lambda s: s["training"].update(checkpoint_every=-1),
                                         "training.checkpoint_every: Input should be greater than or equal to 0"),
        "moved eval_fraction": (lambda s: s["tasks"][0].update(eval_fraction=0.2),
                                "`eval_fraction` is now `validation_fraction`"),
        "fraction outside (0, 1)": (lambda s: s["tasks"][0].update(validation_fraction=1.0),
                                    "tasks[0].validation_fraction: Input should be less than 1"),
        "search on test": (lambda s: s["search"].update(metric="test/accuracy"),
                           "search.metric: 'test/accuracy' cannot drive the search: searches read validation "
                           "metrics only (use 'validation/accuracy')"),
        "test labels never trained": (lambda s: s["tasks"][0].update(test_file=str(write_csv(
            tmp / "unseen.csv", "text,label", ["fine film,positive", "odd film,zebra"]))),
            "has 1 label(s) the training data never has: 'zebra'"),
        "empty validation file": (lambda s: s["tasks"][0].update(validation_file=str(write_csv(
            tmp / "empty-val.csv", "text,label", []))), "has an empty validation split"),
        "sparse budget out of reach": (lambda s: (s.update(methods={"gps": {"calibration_batches": 1}}),
                                                  s.update(budget=10)),
                                       "budget: gps cannot train 10 parameters on sentiment"),
        "bias eval without an LM head": (lambda s: s["tasks"][0].update(bias_eval=["crows_pairs"]),
                                         "tasks[0].bias_eval: crows_pairs: model"),
        "bbq on a text task": (lambda s: s["tasks"][0].update(bias_eval=["bbq"]),
                               "tasks[0].bias_eval: bbq: needs a multiple-choice task"),
        "empty counterfactual corpus": (lambda s: (s["methods"].update(peft_debias={}), s["tasks"][0].update(
            dataset=str(write_csv(tmp / "no-people.csv", "text,label", ["a fine film,1", "a dull plot,0"] * 20)))),
            "methods.peft_debias: none of the task's 32 training texts holds a gender word"),
        "pruning ratio of one": (lambda s: s["methods"].update(light_peft={"head_ratio": 1.0}),
                                 "methods.light_peft.head_ratio: 1.0 is above the allowed range (< 1.0)"),
    }


CASES = list(breakages(Path("/")))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, command, tmp_path, peftlab_home, sentiment_csv, tiny_bert_dir):
    import ray

    breaking, expected = breakages(tmp_path)[case]
    spec_path = tmp_path / "spec.yaml"
    if isinstance(breaking, str):
        spec_path.write_text(breaking)
    else:
        spec = good_spec(sentiment_csv, tiny_bert_dir)
        breaking(spec)
        spec_path.write_text(yaml.safe_dump(spec))

    result = runner.invoke(app, [command, str(spec_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(spec_path) in lines[0], result.stderr
    assert expected in lines[0]
    assert not ray.is_initialized()
    assert not peftlab_home.exists() or not any(peftlab_home.iterdir())


@pytest.mark.parametrize("resources, expected", [
    ({"gpus_per_trial": 2, "workers_per_trial": 2},
     "resources.gpus_per_trial: a trial needs 4 GPUs (2 workers x 2) but this machine has 0"),
    ({"cpus_per_trial": 4096}, "resources.cpus_per_trial: a trial needs 4096 CPUs but this machine has"),
])
def test_run_refuses_a_trial_this_machine_cannot_place(resources, expected, tmp_path, peftlab_home, sentiment_csv,
                                                      tiny_bert_dir):
    import ray

    spec = good_spec(sentiment_csv, tiny_bert_dir)
    spec["methods"].pop("bitfit")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**spec, "resources": resources}))
    assert runner.invoke(app, ["validate", str(spec_path)]).exit_code == 0  # the spec itself is fine
    result = runner.invoke(app, ["run", str(spec_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {spec_path}: {expected}"), result.stderr
    assert not ray.is_initialized()
    assert not peftlab_home.exists() or not any(peftlab_home.iterdir())


@pytest.mark.parametrize("option, value, expected", [
    ("--store", "foo://bar", "results store URL 'foo://bar': unsupported database 'foo'"),
    ("--store", "sqlite:////proc/peftlab/results.db", "results store /proc/peftlab/results.db cannot be created"),
    ("--store", "sqlite:///{file}/results.db", "cannot be created: {file} is a file, not a folder"),
    ("--store", "postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot reach the results store at 127.0.0.1:1"),
    ("--tracking-uri", "http://127.0.0.1:1", "cannot reach MLflow tracking at 127.0.0.1:1"),
    ("--tracking-uri", "foo://bar", "MLflow tracking URI 'foo://bar': unsupported scheme 'foo'"),
    ("--tracking-uri", "sqlite:////proc/peftlab/mlflow.db", "MLflow tracking database /proc/peftlab/mlflow.db cannot be created"),
])
def test_bad_store_or_tracking_location_fails_at_once(option, value, expected, tmp_path, peftlab_home, sentiment_csv,
                                                     tiny_bert_dir):
    import ray

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    value, expected = value.format(file=a_file), expected.format(file=a_file)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(sentiment_csv, tiny_bert_dir)))
    result = runner.invoke(app, ["run", str(spec_path), option, value])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not ray.is_initialized()
    assert not peftlab_home.exists() or not any(peftlab_home.iterdir())
    assert a_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "spec.yaml"]


class _Planted:
    """A pickle that creates a file when loaded: stands for code run from planted Tune state."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant_state(spec: dict, marker: Path) -> Path:
    import pickle

    from peftlab.spec import parse_spec
    from peftlab.state import state_path

    parsed = parse_spec(spec)
    path = state_path(parsed.name, parsed.tasks[0].label)
    path.mkdir(parents=True)
    (path / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    return path


def test_state_from_elsewhere_is_never_restored(tmp_path, peftlab_home, sentiment_csv, tiny_bert_dir):
    import ray

    from peftlab.spec import parse_spec
    from peftlab.state import state_path
    from peftlab.store import ResultsStore

    spec = good_spec(sentiment_csv, tiny_bert_dir)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    marker = tmp_path / "code-ran"
    planted = _plant_state(spec, marker)

    # A store that never saw the experiment: `run` refuses and names `resume`.
    result = runner.invoke(app, ["run", str(spec_path)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and f"Tune state of experiment 'bad-input' exists at {planted}" in line
    assert "holds no such experiment" in line and "peftlab resume bad-input" in line

    # A store that holds it, but state peftlab did not write for it: `resume` refuses to unpickle.
    parsed = parse_spec(spec)
    ResultsStore(f"sqlite:///{peftlab_home / 'results.db'}").create_experiment(
        parsed.name, parsed.model_dump(mode="json"), parsed.spec_hash(), "validation/accuracy", "max", "test", {})
    result = runner.invoke(app, ["resume", "bad-input"])
    assert result.exit_code == 2, result.output
    assert f"Tune state at {planted} has no peftlab ownership record" in result.stderr
    assert not marker.exists() and not ray.is_initialized()

    # Names become folder names only through a safe key, directly under the Ray storage.
    for label in ("../../../../tmp/x", "a" * 300, "café data (1).csv"):
        path = state_path("exp", label)
        assert path.parent == peftlab_home / "ray" and len(path.name) < 100
        assert all(c.isalnum() or c in "-_." for c in path.name)


def test_gradient_checkpointing_on_a_model_without_it_is_refused(tmp_path, peftlab_home, data_dir):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "gc", "model": "resnet20-cifar10", "methods": {"lora": {}},
        "tasks": [{"type": "image-classification", "dataset": "breastmnist"}],
        "training": {"gradient_checkpointing": True}}))
    result = runner.invoke(app, ["validate", str(spec_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"error: {spec_path}: training.gradient_checkpointing: LogitsClassifier (resnet20-cifar10, tasks[0]) "
        "does not support gradient checkpointing"), result.stderr


def test_real_process_exit_code_and_stderr(tmp_path):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("name: x\ntasks: [{dataset: sst2}]\nmethods: {nope: {}}\n")
    done = subprocess.run([sys.executable, "-m", "peftlab.cli", "validate", str(spec_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {spec_path}: methods.nope: unknown method 'nope' (known: ")
    assert "lora" in lines[0]


def test_validate_prints_the_plan(tmp_path, peftlab_home, sentiment_csv, tiny_bert_dir):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(sentiment_csv, tiny_bert_dir)))
    result = runner.invoke(app, ["validate", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert "lora" in result.stdout and "bitfit" in result.stdout and "is valid" in result.stdout
    assert "r=one of 2, 4" in result.stdout


def test_validate_prints_each_split_and_strict_refuses_data_warnings(tmp_path, peftlab_home, sentiment_csv,
                                                                     tiny_bert_dir):
    spec = good_spec(sentiment_csv, tiny_bert_dir)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(spec_path), "--strict"])
    assert result.exit_code == 0, result.output
    # 400 rows: a stratified 10% (40) carved out for test, then 10% of the rest (36) for validation.
    cells = [[c.strip() for c in line.split("│")] for line in result.stdout.splitlines() if line.count("│") >= 5]
    rows = {c[2]: c[3] for c in cells if c[2] in ("train", "validation", "test")}
    assert rows == {"train": "324", "validation": "36", "test": "40"}
    # A class with one training example, labels that differ only by case or by surrounding space:
    # warnings, refusals with --strict.
    odd = write_csv(tmp_path / "odd.csv", "text,label", [f"text {i},{['pos', 'neg'][i % 2]}" for i in range(40)]
                    + ["a rare one,rare", "shouting,POS", "spaced,neg  "])
    spec["tasks"][0].update(dataset=str(odd), test_fraction=0.05, validation_fraction=0.05)
    spec_path.write_text(yaml.safe_dump(spec))
    lenient = runner.invoke(app, ["validate", str(spec_path)])
    assert lenient.exit_code == 0, lenient.output
    assert "fewer than two training examples" in lenient.stdout and "differ only by case" in lenient.stdout
    assert "'neg', 'neg  ' differ only by surrounding space and are read as one class 'neg'" in lenient.stdout
    strict = runner.invoke(app, ["validate", str(spec_path), "--strict"])
    assert strict.exit_code == 2 and "data warning(s) and --strict" in strict.stderr


@pytest.fixture(scope="module")
def llama_stand_in(tmp_path_factory):
    """A Llama-style decoder wide enough for the examples' block sizes (Bone's 64), random weights."""
    from peftlab.workers.synthetic import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama-128"), hidden=128)


@pytest.mark.parametrize("example", sorted(path.name for path in (ROOT / "examples").glob("*.yaml")))
def test_every_example_validates(example, peftlab_home, data_dir, llama_stand_in, built_backbones, tmp_path):
    # Preflight loads each task's data and model structure: every method of the example applies
    # (peftlab's own backbones, where an example names them, built by their recipes with a few steps).
    path = ROOT / "examples" / example
    spec = yaml.safe_load(path.read_text())
    model = spec.get("model") or ""
    if "/" in model and not Path(model).exists():
        # No Hub here: the example is refused in one line naming its model, then checked against a
        # local decoder of the same architecture (the Llama-style decoders are the examples' Hub models).
        refused = runner.invoke(app, ["validate", str(path)])
        assert refused.exit_code == 2 and f"cannot load model '{model}'" in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1
        path = tmp_path / example
        path.write_text(yaml.safe_dump({**spec, "model": str(llama_stand_in)}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.stdout


def test_methods_lists_registry_with_formulas():
    result = runner.invoke(app, ["methods", "--format", "json"])
    assert result.exit_code == 0
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    assert {"full", "linear_probe", "bitfit", "lora", "dora", "ia3", "prompt_tuning"} <= set(methods)
    assert methods["lora"]["mergeable"] is True and methods["prompt_tuning"]["mergeable"] is False
    assert methods["lora"]["hyperparameters"]["r"]["default"] == 8
    assert "r" in methods["lora"]["formula"]
    table = runner.invoke(app, ["methods"])
    assert table.exit_code == 0 and "dora" in table.stdout
    listed = runner.invoke(app, ["methods", "--format", "csv"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(listed.stdout))}
    assert rows.keys() == methods.keys() and "r=8" in rows["lora"]["hyperparameters"]


def test_methods_matrix_says_where_each_method_applies_and_why_not():
    result = runner.invoke(app, ["methods", "--matrix", "--format", "json"])
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)
    assert set(cells) == {m["name"] for m in json.loads(runner.invoke(app, ["methods", "--format", "json"]).stdout)}
    columns = set(cells["lora"])
    assert {"causal-lm (Llama)", "image-classification (ViT)", "image-classification (CIFAR ResNet)"} <= columns
    assert all(not problems for problems in cells["lora"].values())  # LoRA: every architecture
    for method in ("houlsby", "adaptformer", "ether", "bora", "spectral_add", "spectral_rot", "ether_plus"):
        applies = {label for label, problems in cells[method].items() if not problems}
        assert applies == columns - {"image-classification (CIFAR ResNet)"}, method
    assert "architecture table has no entry" in cells["houlsby"]["image-classification (CIFAR ResNet)"][0]
    assert {label for label, problems in cells["vpt"].items() if not problems} == {"image-classification (ViT)"}
    assert "needs a sequence of image patch tokens" in cells["vpt"]["text-classification (BERT)"][0]
    assert "needs a new task head, which causal-lm tasks do not offer" in cells["linear_probe"]["causal-lm (GPT-2)"][0]
    # BitFit where a Llama-style decoder has no bias terms and a causal LM no new head: nothing to train.
    assert {label for label, problems in cells["bitfit"].items() if problems} == {"causal-lm (Llama)"}
    assert "has none; with no new head on causal-lm tasks, nothing would train" in cells["bitfit"]["causal-lm (Llama)"][0]
    table = runner.invoke(app, ["methods", "--matrix"])
    assert table.exit_code == 0 and "no [1]" in table.stdout and "[1] " in table.stdout


def test_results_without_a_store(peftlab_home):
    result = runner.invoke(app, ["results"])
    assert result.exit_code == 2
    assert "no results store" in result.stderr


def test_import_platform_from_repository_root_is_the_standard_library():
    done = subprocess.run([sys.executable, "-c", "import platform, sys; print(platform.__file__); print(platform.python_version())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path = done.stdout.splitlines()[0]
    assert not path.startswith(str(ROOT)) and path.endswith("platform.py")
    assert done.stdout.splitlines()[1] == ".".join(map(str, sys.version_info[:3]))


def test_readme_methods_table_is_the_registry():
    result = runner.invoke(app, ["methods", "--format", "markdown"])
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert section == result.stdout, "README's methods table is stale: regenerate with `peftlab methods --format markdown`"


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:1", "cannot reach Ray at 127.0.0.1:1"),
    ("ray://127.0.0.1:1", "cannot reach Ray at ray://127.0.0.1:1"),
    ("not an address", "cannot use Ray address 'not an address'"),
])
def test_unreachable_cluster_is_one_line_and_writes_nothing(address, expected, tmp_path, peftlab_home,
                                                            sentiment_csv, tiny_bert_dir):
    import ray

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(sentiment_csv, tiny_bert_dir)))
    result = runner.invoke(app, ["run", str(spec_path), "--address", address])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert expected in result.stderr
    assert not ray.is_initialized()
    assert not peftlab_home.exists() or not any(peftlab_home.iterdir())
