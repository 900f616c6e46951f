"""Text-classification loaders: the registry on the real files, local files, and every user error."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftlab.errors import UserError
from peftlab.workers.data import DATASETS, SplitOptions, TextClassificationData, load_text_classification

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
    "name, n_train, n_validation, n_test, num_labels, train_counts",
    [
        ("sst2", 6920, 872, 1821, 2, {0: 3310, 1: 3610}),
        ("banking77", 10003, None, 3080, 77, None),
        ("fomc", 1903, None, 476, 3, {0: 498, 1: 476, 2: 929}),
    ],
)
def test_registry_splits(name, n_train, n_validation, n_test, num_labels, train_counts):
    """Official splits where they exist, else a stratified 10% of train carved out for validation."""
    data = load_text_classification(name, data_dir=DATA)
    carved = n_validation is None
    n_validation = round(n_train * 0.1) if carved else n_validation
    kept = n_train - n_validation if carved else n_train
    assert data.sizes == {"train": kept, "validation": n_validation, "test": n_test}
    for split, n in data.sizes.items():
        assert len(getattr(data, f"{split}_texts")) == len(getattr(data, f"{split}_labels")) == n
    assert data.num_labels == num_labels
    assert set(data.train_labels) == set(range(num_labels))
    assert all(isinstance(text, str) and text for text in data.train_texts + data.validation_texts + data.test_texts)
    if train_counts:
        whole = Counter(data.train_labels) + Counter(data.validation_labels) if carved else Counter(data.train_labels)
        assert whole == train_counts
        if carved:
            assert all(abs(Counter(data.validation_labels)[k] - v * 0.1) <= 1 for k, v in train_counts.items())


@needs_data
def test_registry_label_names():
    assert load_text_classification("sst2", data_dir=DATA).label_names == ["negative", "positive"]
    fomc = load_text_classification("fomc", data_dir=DATA)
    assert fomc.label_names == ["dovish", "hawkish", "neutral"]
    assert Counter(fomc.test_labels) == {0: 127, 1: 124, 2: 225}
    banking = load_text_classification("banking77", data_dir=DATA)
    categories = json.loads((DATA / "text/banking77/categories.json").read_text())
    assert sorted(banking.label_names) == sorted(categories)
    # The Hub's ClassLabel order: case-insensitive, so "Refund_not_showing_up" is id 51.
    assert banking.label_names[0] == "activate_my_card"
    assert banking.label_names[51] == "Refund_not_showing_up"


@needs_data
def test_registry_reads_peftlab_data_dir(monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(DATA))
    assert len(load_text_classification("fomc").test_texts) == 476


def test_registry_metadata():
    assert set(DATASETS) >= {"sst2", "banking77", "fomc"}
    assert (DATASETS["sst2"].domain, DATASETS["sst2"].metric, DATASETS["sst2"].hub_id) == (
        "nlp/sentiment", "accuracy", "SetFit/sst2")
    assert (DATASETS["banking77"].domain, DATASETS["banking77"].hub_id) == ("nlp/intent", "PolyAI/banking77")
    assert (DATASETS["fomc"].domain, DATASETS["fomc"].metric) == ("finance/monetary-policy", "macro_f1")


@needs_data
def test_subsampling_is_deterministic_and_nested():
    def load(n: int) -> TextClassificationData:
        return load_text_classification("sst2", data_dir=DATA,
                                        options=SplitOptions(max_train_samples=n, max_eval_samples=50))

    first, again, larger = load(200), load(200), load(400)
    assert len(first.train_texts) == 200 and len(first.validation_texts) == len(first.test_texts) == 50
    assert first == again
    assert larger.train_texts[:200] == first.train_texts  # first N of the same shuffle
    full = load_text_classification("sst2", data_dir=DATA)
    pairs = set(zip(full.train_texts, full.train_labels))
    assert set(zip(first.train_texts, first.train_labels)) <= pairs
    # Asking for more than there is keeps everything.
    assert len(load_text_classification("fomc", data_dir=DATA,
                                        options=SplitOptions(max_eval_samples=10**6)).test_texts) == 476


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
    options = SplitOptions(validation_fraction=0.25, test_fraction=0.25)
    data = load_text_classification(str(path), text_column="sentence", label_column="y", options=options)
    assert data.label_names == ["Mixed", "neg", "pos"]
    # Test is carved first (10 of 40), then validation from the rest (8 of 30); both stratified.
    assert data.sizes == {"train": 22, "validation": 8, "test": 10}
    everything = data.train_texts + data.validation_texts + data.test_texts
    assert sorted(everything) == sorted(row["sentence"] for row in rows)
    by_text = {row["sentence"]: data.label_names.index(row["y"]) for row in rows}
    assert all(by_text[t] == y for t, y in zip(everything, data.train_labels + data.validation_labels + data.test_labels))
    assert sorted(Counter(data.test_labels).values()) == [3, 3, 4]
    again = load_text_classification(str(path), text_column="sentence", label_column="y", options=options)
    assert again == data


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_local_file_int_labels_keep_values(tmp_path, suffix):
    rows = [{"text": f"t{i}", "label": [0, 2, 5][i % 3]} for i in range(30)]
    data = load_text_classification(str(_write(tmp_path / f"d{suffix}", rows)))
    assert data.label_names == ["0", "1", "2", "3", "4", "5"] and data.num_labels == 6
    assert set(data.train_labels + data.validation_labels) == {0, 2, 5}


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
    with pytest.raises(UserError, match="too few to carve out a test split"):
        load_text_classification(str(path))


def test_bad_arguments(tmp_path):
    path = _write(tmp_path / "d.csv", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    for options, key in ((SplitOptions(validation_fraction=1.0), "validation_fraction"),
                         (SplitOptions(test_fraction=0.0), "test_fraction"),
                         (SplitOptions(max_train_samples=0), "max_train_samples")):
        with pytest.raises(UserError, match=key):
            load_text_classification(str(path), options=options)


def test_validation_and_test_files_replace_the_carve_outs(tmp_path):
    rows = [{"text": f"train {i}", "label": ["a", "b"][i % 2]} for i in range(20)]
    train = _write(tmp_path / "train.csv", rows)
    val = _write(tmp_path / "val.jsonl", [{"text": "val 0", "label": "a"}, {"text": "val 1", "label": "b"}])
    test = _write(tmp_path / "test.tsv", [{"text": f"test {i}", "label": "b"} for i in range(3)])
    data = load_text_classification(str(train), options=SplitOptions(validation_file=str(val), test_file=str(test)))
    assert data.sizes == {"train": 20, "validation": 2, "test": 3}
    assert data.validation_texts == ["val 0", "val 1"] and data.test_labels == [1, 1, 1]
    only_test = load_text_classification(str(train), options=SplitOptions(test_file=str(test)))
    assert only_test.sizes == {"train": 18, "validation": 2, "test": 3}
    assert not set(only_test.validation_texts) & set(only_test.train_texts)


def test_labels_the_training_data_never_has_are_refused(tmp_path):
    train = _write(tmp_path / "train.csv", [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(10)])
    test = _write(tmp_path / "test.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "zebra"}])
    with pytest.raises(UserError, match=r"the test split of .* has 1 label\(s\) the training data never has: 'zebra'"):
        load_text_classification(str(train), options=SplitOptions(test_file=str(test)))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(UserError, match="empty"):
        load_text_classification(str(train), options=SplitOptions(validation_file=str(empty)))


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


def test_a_carve_out_never_takes_a_class_out_of_training(tmp_path):
    """A class with one example stays in training (validate warns about it), whatever the fractions."""
    rows = [{"text": f"t{i}", "label": "common"} for i in range(30)] + [{"text": "only one", "label": "rare"}]
    path = _write(tmp_path / "rare.csv", rows)
    for fraction in (0.1, 0.3, 0.45):
        data = load_text_classification(str(path), options=SplitOptions(validation_fraction=fraction,
                                                                         test_fraction=fraction))
        assert "only one" in data.train_texts, fraction
