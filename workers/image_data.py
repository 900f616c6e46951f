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
from peftlab.workers.data import SplitOptions
from peftlab.workers.splits import SPLITS, stratified_pick, three_way

Arrays = list[np.ndarray | None]
"""[train_images N x C x H x W uint8, train_labels N int64, validation images, labels, test images,
labels]; the validation pair None where the source has no validation split."""

MNIST_SPLIT_SEED = 0
"""Fixed, and independent of any trial's seed: every run sees the same MNIST test set."""
MNIST_TEST_SIZE = 2000


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
    """Reads the train, validation and test arrays from the data set's folder."""
    label_names: tuple[str, ...]
    downloads: tuple[tuple[str, str], ...] = ()
    """(file name in the folder, public URL): what is fetched when no local copy is configured."""


@dataclass
class ImageClassificationData:
    train_images: torch.Tensor
    """uint8, N x C x H x W, raw pixel values 0..255 (no normalisation)."""
    train_labels: torch.Tensor
    """int64, N, values 0..num_labels-1."""
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    label_names: list[str]
    channels: int
    sizes: dict[str, int] | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of "validation" or "test"."""
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _read_medmnist(file_name: str) -> Callable[[Path], Arrays]:
    """A MedMNIST npz: {split}_images (N,28,28) uint8, {split}_labels (N,1) or (N,) uint8 for its
    official train, val and test splits."""

    def read(folder: Path) -> Arrays:
        path = _require(folder / file_name)
        try:
            with np.load(path) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        out = []
        for split in ("train", "val", "test"):
            images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
            if images is None or labels is None:
                raise UserError(f"no '{split}_images'/'{split}_labels' arrays (has: {', '.join(arrays)})",
                                where=str(path))
            if images.ndim != 3 or images.dtype != np.uint8 or len(labels) != len(images):
                raise UserError(f"'{split}_images' is {images.dtype} {images.shape} with {len(labels)} "
                                "labels; expected uint8 (N, H, W) with N labels", where=str(path))
            out += [images[:, None], labels.reshape(len(labels)).astype(np.int64)]
        return out

    return read


def _read_mnist(folder: Path) -> Arrays:
    """The 10,000-digit MNIST test set, re-split into 8,000 train / 2,000 test (validation is then
    carved from train).

    Stratified by digit (each digit's share of the test set is its share of the 10,000, rounded
    by largest remainder) with the fixed MNIST_SPLIT_SEED, so the split never depends on a seed.
    """
    images = _read_idx(folder / "t10k-images-idx3-ubyte.gz", 0x803)
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"MNIST has {len(images)} images but {len(labels)} labels", where=str(folder))
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"MNIST labels must be 0..9, found {labels.min()}..{labels.max()}", where=str(folder))
    test_idx = stratified_pick(labels, len(labels), MNIST_TEST_SIZE, np.random.default_rng(MNIST_SPLIT_SEED))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return [images[train_mask][:, None], labels[train_mask], None, None, images[test_idx][:, None], labels[test_idx]]


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
        if file_name == "sat.trn":
            out += [None, None]  # no validation file: carved from training
    return out


_MEDMNIST = "MedMNIST v2, https://medmnist.com (the `medmnist` package downloads {}.npz)"
_MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{}.npz?download=1"
"""Where the `medmnist` package downloads its 28x28 files from."""

IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    info.name: info
    for info in (
        # The official val split drives the search and the official test split (the one MedMNIST
        # reports AUROC on) is scored once per trial, so the numbers compare with the benchmark.
        ImageDatasetInfo(
            name="pneumoniamnist", domain="medical/chest-xray", metric="auroc",
            license="CC BY 4.0 (MedMNIST v2)", origin=_MEDMNIST.format("pneumoniamnist"),
            local_copy="https://github.com/varun19424/pneumonia_mnist@9361a718d67e8a40f1ef8929db8c5682add8bd70",
            folder="medical/pneumoniamnist",
            description="Normal vs pneumonia chest X-rays, 28x28 grey: train 3,882 (official 4,708 with "
            "normal undersampled by the uploader) / validation 524 / test 624.",
            read_local=_read_medmnist("pneumoniamnist.npz"),
            label_names=("normal", "pneumonia"),
            downloads=(("pneumoniamnist.npz", _MEDMNIST_URL.format("pneumoniamnist")),),
        ),
        ImageDatasetInfo(
            name="breastmnist", domain="medical/ultrasound", metric="auroc",
            license="CC BY 4.0 (MedMNIST v2)", origin=_MEDMNIST.format("breastmnist"),
            local_copy="https://github.com/KamalJain777/AMLS_25_26_SN24205421"
            "@b7f638d33cc9e6dc1a0de213b243598105837d5f",
            folder="medical/breastmnist",
            description="Malignant vs normal/benign breast ultrasound, 28x28 grey: train 546 / validation 78 "
            "/ test 156.",
            read_local=_read_medmnist("breastmnist.npz"),
            label_names=("malignant", "normal/benign"),
            downloads=(("breastmnist.npz", _MEDMNIST_URL.format("breastmnist")),),
        ),
        ImageDatasetInfo(
            name="mnist", domain="vision/digits", metric="accuracy",
            license="CC BY-SA 3.0", origin="https://huggingface.co/datasets/ylecun/mnist (its test split)",
            local_copy="https://github.com/kelas/mnist@283b387221ab46655e600cfcc25d843bb14292b9",
            folder="vision/mnist_t10k",
            description="The 10,000 MNIST test digits, 28x28 grey, re-split (stratified, fixed seed) "
            "into train 8,000 (validation carved out) / test 2,000.",
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
            "land-cover classes of the centre pixel: train 4,435 (validation carved out) / test 2,000.",
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
    options: SplitOptions = SplitOptions(),
) -> ImageClassificationData:
    """Load registered image data set `name` from `data_dir`, else PEFTLAB_DATA_DIR, as train,
    validation and test (data.SplitOptions: a validation carve-out where the source has none, and
    seeded caps). Raises UserError, one line, for anything wrong."""
    options.check()
    if name not in IMAGE_DATASETS:
        raise UserError(f"unknown image dataset '{name}' (known: {', '.join(IMAGE_DATASETS)})")
    if options.validation_file or options.test_file:
        raise UserError(f"image dataset '{name}' brings its own splits; validation_file and test_file "
                        "are for text files")
    info = IMAGE_DATASETS[name]
    root = data_dir or settings.data_dir()
    folder = Path(root) / info.folder if root is not None else _downloaded(info)
    if not folder.is_dir():
        raise UserError(f"dataset '{name}' not found at {folder}; set {settings.ENV_DATA} to a folder "
                        f"holding {info.folder}/ (public origin: {info.origin})")
    arrays = info.read_local(folder)
    pairs = [(arrays[i], arrays[i + 1]) for i in (0, 2, 4)]
    for split, (_, labels) in zip(SPLITS, pairs):
        if labels is None:
            continue
        if len(labels) == 0:
            raise UserError(f"dataset '{name}' has an empty {split} split", where=str(folder))
        if labels.min() < 0 or labels.max() >= len(info.label_names):
            raise UserError(f"{split} labels must be 0..{len(info.label_names) - 1}, found "
                            f"{labels.min()}..{labels.max()}", where=str(folder))
    present = [p for p in pairs if p[0] is not None]
    images = np.concatenate([p[0] for p in present])
    labels = np.concatenate([p[1] for p in present])
    split = three_way(len(pairs[0][1]), None if pairs[1][1] is None else len(pairs[1][1]), len(pairs[2][1]),
                      where=name, labels=labels, validation_fraction=options.validation_fraction,
                      max_train=options.max_train_samples, max_eval=options.max_eval_samples)

    def take(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(images[rows])), torch.from_numpy(labels[rows])

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = take(split.train), take(split.validation), take(split.test)
    return ImageClassificationData(
        train_images=train_x, train_labels=train_y, validation_images=val_x, validation_labels=val_y,
        test_images=test_x, test_labels=test_y, label_names=list(info.label_names),
        channels=int(images.shape[1]), sizes=split.sizes(),
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


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    return path
