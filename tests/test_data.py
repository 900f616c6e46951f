"""Text-classification loaders: the registry on the real files, local files, and every user error."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftlab.errors import UserError
from peftlab.workers.data import DATASETS, TextClassificationData, load_text_classification

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data sets not found at {DATA}")


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Offline Hub with an empty cache. The flags are read when the libraries are imported, so
    the already-imported constants are patched as well as the environment."""
    import datasets
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)


# --- registry on the real files ------------------------------------------------------------

@needs_data
@pytest.mark.parametrize(
    "name, n_train, n_eval, num_labels, train_counts",
    [
        ("sst2", 6920, 872, 2, {0: 3310, 1: 3610}),
        ("banking77", 10003, 3080, 77, None),
        ("fomc", 1903, 476, 3, {0: 498, 1: 476, 2: 929}),
    ],
)
def test_registry_official_splits(name, n_train, n_eval, num_labels, train_counts):
    data = load_text_classification(name, data_dir=DATA)
    assert (len(data.train_texts), len(data.train_labels)) == (n_train, n_train)
    assert (len(data.eval_texts), len(data.eval_labels)) == (n_eval, n_eval)
    assert data.num_labels == num_labels
    assert set(data.train_labels) == set(range(num_labels))
    assert all(isinstance(text, str) and text for text in data.train_texts + data.eval_texts)
    if train_counts:
        assert Counter(data.train_labels) == train_counts


@needs_data
def test_registry_label_names():
    assert load_text_classification("sst2", data_dir=DATA).label_names == ["negative", "positive"]
    fomc = load_text_classification("fomc", data_dir=DATA)
    assert fomc.label_names == ["dovish", "hawkish", "neutral"]
    assert Counter(fomc.eval_labels) == {0: 127, 1: 124, 2: 225}
    banking = load_text_classification("banking77", data_dir=DATA)
    categories = json.loads((DATA / "text/banking77/categories.json").read_text())
    assert sorted(banking.label_names) == sorted(categories)
    # The Hub's ClassLabel order: case-insensitive, so "Refund_not_showing_up" is id 51.
    assert banking.label_names[0] == "activate_my_card"
    assert banking.label_names[51] == "Refund_not_showing_up"


@needs_data
def test_registry_reads_peftlab_data_dir(monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(DATA))
    assert len(load_text_classification("fomc").train_texts) == 1903


def test_registry_metadata():
    assert set(DATASETS) >= {"sst2", "banking77", "fomc"}
    assert (DATASETS["sst2"].domain, DATASETS["sst2"].metric, DATASETS["sst2"].hub_id) == (
        "nlp/sentiment", "accuracy", "SetFit/sst2")
    assert (DATASETS["banking77"].domain, DATASETS["banking77"].hub_id) == ("nlp/intent", "PolyAI/banking77")
    assert (DATASETS["fomc"].domain, DATASETS["fomc"].metric) == ("finance/monetary-policy", "macro_f1")


@needs_data
def test_subsampling_is_deterministic_and_nested():
    def load(n: int, seed: int = 0) -> TextClassificationData:
        return load_text_classification("sst2", data_dir=DATA, max_train_samples=n,
                                        max_eval_samples=50, split_seed=seed)

    first, again, other, larger = load(200), load(200), load(200, seed=1), load(400)
    assert len(first.train_texts) == 200 and len(first.eval_texts) == 50
    assert first == again
    assert first.train_texts != other.train_texts
    assert larger.train_texts[:200] == first.train_texts  # first N of the same shuffle
    full = load_text_classification("sst2", data_dir=DATA)
    pairs = set(zip(full.train_texts, full.train_labels))
    assert set(zip(first.train_texts, first.train_labels)) <= pairs
    # Asking for more than there is keeps everything.
    assert len(load_text_classification("fomc", data_dir=DATA, max_eval_samples=10**6).eval_texts) == 476


# --- local files -----------------------------------------------------------------------------

def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        keys = list(rows[0])
        lines = [sep.join(keys)] + [sep.join(str(row[k]) for k in keys) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_local_file_string_labels(tmp_path, suffix):
    rows = [{"sentence": f"text number {i}", "y": ["pos", "neg", "Mixed"][i % 3]} for i in range(40)]
    path = _write(tmp_path / f"data{suffix}", rows)
    data = load_text_classification(str(path), text_column="sentence", label_column="y", eval_fraction=0.25)
    assert data.label_names == ["Mixed", "neg", "pos"]
    assert (len(data.train_texts), len(data.eval_texts)) == (30, 10)
    assert sorted(data.train_texts + data.eval_texts) == sorted(row["sentence"] for row in rows)
    by_text = {row["sentence"]: data.label_names.index(row["y"]) for row in rows}
    assert all(by_text[t] == y for t, y in zip(data.train_texts + data.eval_texts,
                                               data.train_labels + data.eval_labels))
    again = load_text_classification(str(path), text_column="sentence", label_column="y", eval_fraction=0.25)
    assert again == data
    other = load_text_classification(str(path), text_column="sentence", label_column="y",
                                     eval_fraction=0.25, split_seed=7)
    assert set(other.eval_texts) != set(data.eval_texts)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_local_file_int_labels_keep_values(tmp_path, suffix):
    rows = [{"text": f"t{i}", "label": [0, 2, 5][i % 3]} for i in range(30)]
    data = load_text_classification(str(_write(tmp_path / f"d{suffix}", rows)))
    assert data.label_names == ["0", "1", "2", "3", "4", "5"] and data.num_labels == 6
    assert set(data.train_labels + data.eval_labels) == {0, 2, 5}


def test_integer_valued_floats_and_numeric_strings_are_integers(tmp_path):
    # pandas reads "1.0" as a float; a JSON file may quote its integer labels.
    floats = _write(tmp_path / "f.csv", [{"text": f"t{i}", "label": f"{i % 2}.0"} for i in range(10)])
    assert load_text_classification(str(floats)).label_names == ["0", "1"]
    strings = _write(tmp_path / "s.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(10)])
    assert load_text_classification(str(strings)).label_names == ["0", "1"]


# --- user errors ------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(UserError, match="not found.*nope.csv"):
        load_text_classification(str(missing))


def test_missing_registry_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=r"not found.*stsa\.binary\.train"):
        load_text_classification("sst2", data_dir=tmp_path)


def test_unknown_name():
    with pytest.raises(UserError, match="unknown dataset 'sst3'.*sst2, banking77, fomc.*owner/name"):
        load_text_classification("sst3")


@pytest.mark.parametrize("kind, kwargs, missing", [
    ("text", {"text_column": "sentence"}, "sentence"),
    ("label", {"label_column": "y"}, "y"),
])
def test_missing_column_lists_available(tmp_path, kind, kwargs, missing):
    path = _write(tmp_path / "d.csv", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(UserError, match=rf"missing {kind} column '{missing}' \(available columns: text, label\)"):
        load_text_classification(str(path), **kwargs)


@pytest.mark.parametrize("labels, message", [
    ([0.5, 1, 0], "non-integer numbers"),
    (["1", "", "0"], "empty labels"),
    ([1, None, 0], "empty labels"),
    ([1, "pos", 0], "all integers or all strings"),
    ([True, False, True], "booleans"),
    ([[1], [0], [1]], "holds list"),
    ([-1, 0, 1], "negative labels"),
])
def test_bad_labels(tmp_path, labels, message):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(labels)]
    with pytest.raises(UserError, match=rf"label column 'label'.*{message}"):
        load_text_classification(str(_write(tmp_path / "d.jsonl", rows)))


def test_bad_labels_in_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0.5\nb,1\nc,0\n")
    with pytest.raises(UserError, match="non-integer numbers"):
        load_text_classification(str(path))
    path.write_text("text,label\na,\nb,1\nc,0\n")
    with pytest.raises(UserError, match="1 empty labels"):
        load_text_classification(str(path))
    path.write_text("text,label\na,pos\nb,1\nc,neg\n")
    with pytest.raises(UserError, match="mixes numbers and strings"):
        load_text_classification(str(path))


def test_empty_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\n,1\nc,0\n")
    with pytest.raises(UserError, match="text column 'text' has 1 empty values"):
        load_text_classification(str(path))


@pytest.mark.parametrize("name, content", [
    ("empty.csv", ""), ("header.csv", "text,label\n"), ("empty.jsonl", "\n"), ("empty.json", "[]"),
])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="empty|no rows"):
        load_text_classification(str(path))


def test_too_few_rows_to_split(tmp_path):
    path = _write(tmp_path / "one.csv", [{"text": "only", "label": 0}])
    with pytest.raises(UserError, match="too few to split"):
        load_text_classification(str(path))


def test_bad_arguments(tmp_path):
    path = _write(tmp_path / "d.csv", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    with pytest.raises(UserError, match="eval_fraction"):
        load_text_classification(str(path), eval_fraction=1.0)
    with pytest.raises(UserError, match="max_train_samples"):
        load_text_classification(str(path), max_train_samples=0)


def test_unsupported_existing_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="is not a .csv/.tsv/.jsonl/.json file"):
        load_text_classification(str(path))


# --- the Hub, offline ---------------------------------------------------------------------------

def test_hub_id_offline_is_one_clear_error(hub_offline):
    with pytest.raises(UserError) as info:
        load_text_classification("peftlab-tests/no-such-dataset")
    message = str(info.value)
    assert message.startswith("cannot load dataset 'peftlab-tests/no-such-dataset' from the Hugging "
                              "Face Hub (set PEFTLAB_DATA_DIR to a local copy): ")
    assert "\n" not in message


def test_registry_without_data_dir_goes_to_the_hub(hub_offline):
    with pytest.raises(UserError, match="sst2: cannot load dataset 'SetFit/sst2' from the Hugging Face Hub"):
        load_text_classification("sst2")
    with pytest.raises(UserError, match="'fomc' has no Hugging Face Hub copy.*gtfintechlab"):
        load_text_classification("fomc")
