"""Image-classification data sets: the registry of known ones and one loader for their local copies.

Each is read from PEFTLAB_DATA_DIR (laid out like ../shared/datasets) as uint8 N x C x H x W tensors.
"""
from __future__ import annotations

import gzip
import os
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peftlab import settings
from peftlab.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(train_images N x C x H x W uint8, train_labels N int64, eval_images, eval_labels)."""

MNIST_SPLIT_SEED = 0
"""Fixed, and independent of the loader's `seed`: every run sees the same MNIST test set."""
MNIST_EVAL_SIZE = 2000


@dataclass(frozen=True)
class ImageDatasetInfo:
    """A known image data set: what it is, how it is scored, and where its files come from."""

    name: str
    domain: str
    """Domain/task as the dashboard groups it, e.g. "medical/chest-xray"."""
    metric: str
    """"auroc" (binary), "accuracy" or "macro_f1"."""
    license: str
    origin: str
    """The public origin of the data (what a user would download without a local copy)."""
    local_copy: str
    """The repository and commit the files under PEFTLAB_DATA_DIR come from (their SOURCE.txt)."""
    folder: str
    """Folder under the data root."""
    description: str
    read_local: Callable[[Path], Arrays]
    """Reads the (train, eval) arrays from the data set's folder."""
    label_names: tuple[str, ...]
    downloads: tuple[tuple[str, str], ...] = ()
    """(file name in the folder, public URL): what is fetched when no local copy is configured."""


@dataclass
class ImageClassificationData:
    train_images: torch.Tensor
    """uint8, N x C x H x W, raw pixel values 0..255 (no normalisation)."""
    train_labels: torch.Tensor
    """int64, N, values 0..num_labels-1."""
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    label_names: list[str]
    channels: int

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _read_medmnist(file_name: str, eval_split: str) -> Callable[[Path], Arrays]:
    """A MedMNIST npz: {split}_images (N,28,28) uint8, {split}_labels (N,1) or (N,) uint8."""

    def read(folder: Path) -> Arrays:
        path = _require(folder / file_name)
        try:
            with np.load(path) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        out = []
        for split in ("train", eval_split):
            images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
            if images is None or labels is None:
                raise UserError(f"no '{split}_images'/'{split}_labels' arrays (has: {', '.join(arrays)})",
                                where=str(path))
            if images.ndim != 3 or images.dtype != np.uint8 or len(labels) != len(images):
                raise UserError(f"'{split}_images' is {images.dtype} {images.shape} with {len(labels)} "
                                "labels; expected uint8 (N, H, W) with N labels", where=str(path))
            out += [images[:, None], labels.reshape(len(labels)).astype(np.int64)]
        return out[0], out[1], out[2], out[3]

    return read


def _read_mnist(folder: Path) -> Arrays:
    """The 10,000-digit MNIST test set, re-split into 8,000 train / 2,000 eval.

    Stratified by digit (each digit's share of the eval set is its share of the 10,000, rounded
    by largest remainder) with the fixed MNIST_SPLIT_SEED, so the split never depends on `seed`.
    """
    images = _read_idx(folder / "t10k-images-idx3-ubyte.gz", 0x803)
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"MNIST has {len(images)} images but {len(labels)} labels", where=str(folder))
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"MNIST labels must be 0..9, found {labels.min()}..{labels.max()}", where=str(folder))
    eval_idx = _stratified_pick(labels, MNIST_EVAL_SIZE, np.random.default_rng(MNIST_SPLIT_SEED))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[eval_idx] = False
    return images[train_mask][:, None], labels[train_mask], images[eval_idx][:, None], labels[eval_idx]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip): big-endian magic (0x08 = uint8, then the number of dimensions), sizes, data."""
    try:
        raw = gzip.decompress(_require(path).read_bytes())
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise UserError(f"not an IDX file with magic {magic:#x} (found {found!r})", where=str(path))
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"header says {shape} but holds {data.size} values", where=str(path))
    return data.reshape(shape)


def _stratified_pick(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `size` items, each class contributing its proportional share."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    shares = np.floor(exact).astype(int)
    shares[np.argsort(-(exact - shares), kind="stable")[: size - shares.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, shares)]
    return np.sort(np.concatenate(picked))


LANDSAT_CLASSES = (1, 2, 3, 4, 5, 7)
"""UCI class codes in sat.trn/sat.tst; 6 ("mixture") has no examples. Mapped to 0..5 in this order."""


def _read_landsat(folder: Path) -> Arrays:
    """sat.trn / sat.tst: 36 ints then the class code per line.

    The UCI documentation orders the 36 values pixel by pixel (top-left, top-middle, ... bottom-right,
    row-major), the 4 spectral bands of a pixel together; so a row reshapes to (3, 3, 4) = H x W x band
    and is transposed to band x H x W, the 4 bands becoming channels.
    """
    out = []
    for file_name in ("sat.trn", "sat.tst"):
        path = _require(folder / file_name)
        try:
            rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
        except ValueError as exc:
            raise UserError(f"cannot read {path}: {exc}") from exc
        if rows.shape[1] != 37 or rows[:, :36].min() < 0 or rows[:, :36].max() > 255:
            raise UserError(f"expected 36 values 0..255 and a class per line, got {rows.shape[1]} columns",
                            where=str(path))
        codes = rows[:, 36]
        unknown = sorted(set(codes.tolist()) - set(LANDSAT_CLASSES))
        if unknown:
            raise UserError(f"unknown class codes {unknown} (known: {LANDSAT_CLASSES})", where=str(path))
        images = rows[:, :36].astype(np.uint8).reshape(-1, 3, 3, 4).transpose(0, 3, 1, 2)
        out += [np.ascontiguousarray(images), np.searchsorted(LANDSAT_CLASSES, codes).astype(np.int64)]
    return out[0], out[1], out[2], out[3]


_MEDMNIST = "MedMNIST v2, https://medmnist.com (the `medmnist` package downloads {}.npz)"
_MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{}.npz?download=1"
"""Where the `medmnist` package downloads its 28x28 files from."""

IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    info.name: info
    for info in (
        # Evaluated on the official test split, not val: it is the split MedMNIST reports AUROC on
        # (so numbers compare with the benchmark) and the larger one (624 vs 524; BreastMNIST 156 vs
        # 78, where val AUROC would be very noisy). Cost: a sweep that picks its best trial on eval
        # picks on test, so the best trial's score is optimistic, as for banking77/fomc.
        ImageDatasetInfo(
            name="pneumoniamnist", domain="medical/chest-xray", metric="auroc",
            license="CC BY 4.0 (MedMNIST v2)", origin=_MEDMNIST.format("pneumoniamnist"),
            local_copy="https://github.com/varun19424/pneumonia_mnist@9361a718d67e8a40f1ef8929db8c5682add8bd70",
            folder="medical/pneumoniamnist",
            description="Normal vs pneumonia chest X-rays, 28x28 grey: train 3,882 (official 4,708 with "
            "normal undersampled by the uploader) / test 624.",
            read_local=_read_medmnist("pneumoniamnist.npz", "test"),
            label_names=("normal", "pneumonia"),
            downloads=(("pneumoniamnist.npz", _MEDMNIST_URL.format("pneumoniamnist")),),
        ),
        ImageDatasetInfo(
            name="breastmnist", domain="medical/ultrasound", metric="auroc",
            license="CC BY 4.0 (MedMNIST v2)", origin=_MEDMNIST.format("breastmnist"),
            local_copy="https://github.com/KamalJain777/AMLS_25_26_SN24205421"
            "@b7f638d33cc9e6dc1a0de213b243598105837d5f",
            folder="medical/breastmnist",
            description="Malignant vs normal/benign breast ultrasound, 28x28 grey: train 546 / test 156.",
            read_local=_read_medmnist("breastmnist.npz", "test"),
            label_names=("malignant", "normal/benign"),
            downloads=(("breastmnist.npz", _MEDMNIST_URL.format("breastmnist")),),
        ),
        ImageDatasetInfo(
            name="mnist", domain="vision/digits", metric="accuracy",
            license="CC BY-SA 3.0", origin="https://huggingface.co/datasets/ylecun/mnist (its test split)",
            local_copy="https://github.com/kelas/mnist@283b387221ab46655e600cfcc25d843bb14292b9",
            folder="vision/mnist_t10k",
            description="The 10,000 MNIST test digits, 28x28 grey, re-split (stratified, fixed seed) "
            "into train 8,000 / test 2,000.",
            read_local=_read_mnist, label_names=tuple(str(d) for d in range(10)),
            # The same IDX files as the local copy, from the mirror torchvision downloads from.
            downloads=tuple((f, f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}")
                            for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
        ),
        # macro_f1, not accuracy: the classes are unbalanced (damp grey soil is 9% of train, red
        # soil 24%) and the damp/very damp/grey soils are the ones that get confused; accuracy
        # would hide a model that gives up on the small damp grey class.
        ImageDatasetInfo(
            name="landsat", domain="remote-sensing/land-cover", metric="macro_f1",
            license="CC BY 4.0 (UCI ML Repository)",
            origin="https://archive.ics.uci.edu/dataset/146/statlog+landsat+satellite",
            local_copy="https://github.com/YannisSch/Statlog_Landstat_Satellite_Project"
            "@6f31538326e860b63b09efdb43a0f76f3973ce29",
            folder="remote_sensing/statlog_landsat",
            description="Statlog Landsat: 3x3-pixel, 4-band MSS patches as 4 x 3 x 3 images, 6 "
            "land-cover classes of the centre pixel: train 4,435 / test 2,000.",
            read_local=_read_landsat,
            downloads=tuple((f, f"https://archive.ics.uci.edu/ml/machine-learning-databases/statlog/satimage/{f}")
                            for f in ("sat.trn", "sat.tst")),
            label_names=("red soil", "cotton crop", "grey soil", "damp grey soil",
                         "soil with vegetation stubble", "very damp grey soil"),
        ),
    )
}


def load_image_classification(
    name: str,
    *,
    data_dir: Path | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> ImageClassificationData:
    """Load registered image data set `name` from `data_dir`, else PEFTLAB_DATA_DIR.

    `max_*_samples` take the first N of a seeded shuffle (same seed, same images); without them
    the splits keep their file order. Raises UserError, one line, for anything wrong.
    """
    if name not in IMAGE_DATASETS:
        raise UserError(f"unknown image dataset '{name}' (known: {', '.join(IMAGE_DATASETS)})")
    for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    info = IMAGE_DATASETS[name]
    root = data_dir or settings.data_dir()
    folder = Path(root) / info.folder if root is not None else _downloaded(info)
    if not folder.is_dir():
        raise UserError(f"dataset '{name}' not found at {folder}; set {settings.ENV_DATA} to a folder "
                        f"holding {info.folder}/ (public origin: {info.origin})")
    train_x, train_y, eval_x, eval_y = info.read_local(folder)
    for split, labels in (("train", train_y), ("eval", eval_y)):
        if len(labels) == 0:
            raise UserError(f"dataset '{name}' has an empty {split} split", where=str(folder))
        if labels.min() < 0 or labels.max() >= len(info.label_names):
            raise UserError(f"{split} labels must be 0..{len(info.label_names) - 1}, found "
                            f"{labels.min()}..{labels.max()}", where=str(folder))
    train_idx = _subsample(len(train_y), max_train_samples, np.random.default_rng([seed, 1]))
    eval_idx = _subsample(len(eval_y), max_eval_samples, np.random.default_rng([seed, 2]))
    return ImageClassificationData(
        train_images=torch.from_numpy(np.ascontiguousarray(train_x[train_idx])),
        train_labels=torch.from_numpy(train_y[train_idx]),
        eval_images=torch.from_numpy(np.ascontiguousarray(eval_x[eval_idx])),
        eval_labels=torch.from_numpy(eval_y[eval_idx]),
        label_names=list(info.label_names),
        channels=int(train_x.shape[1]),
    )


def _downloaded(info: ImageDatasetInfo) -> Path:
    """The data set's files fetched from their public origin into the download cache (once)."""
    folder = settings.download_cache() / info.folder
    missing = [(f, url) for f, url in info.downloads if not (folder / f).is_file()]
    if not missing:
        return folder
    needs_copy = (f"dataset '{info.name}' needs a local copy: set {settings.ENV_DATA} to a folder "
                  f"holding {info.folder}/ (public origin: {info.origin})")
    if not info.downloads or any(os.environ.get(v, "") not in ("", "0") for v in settings.OFFLINE_ENV):
        raise UserError(needs_copy)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, url in missing:
        partial = folder / f".{file_name}.part"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except OSError as exc:  # URLError, timeouts and HTTP errors are all OSErrors
            partial.unlink(missing_ok=True)
            raise UserError(f"{needs_copy}; downloading {url} failed: {exc}") from None
        partial.rename(folder / file_name)  # only a complete file gets the real name
    return folder


def _subsample(size: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= size:
        return np.arange(size)
    return rng.permutation(size)[:limit]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    return path
