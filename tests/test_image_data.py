"""Image-classification loaders on the real files: split sizes and class counts as each SOURCE.txt
states them, shapes and dtypes, the MNIST re-split, the Landsat reshape, and the user errors."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from peftlab.errors import UserError
from peftlab.workers.data import SplitOptions
from peftlab.workers.image_data import (
    IMAGE_DATASETS,
    MNIST_TEST_SIZE,
    ImageClassificationData,
    load_image_classification,
)

# name: (official train, official validation or None (carved), test, official train class counts,
# test class counts, channels, H x W)
EXPECTED = {
    "pneumoniamnist": (3882, 524, 624, [388, 3494], [234, 390], 1, (28, 28)),
    "breastmnist": (546, 78, 156, [147, 399], [42, 114], 1, (28, 28)),
    "mnist": (8000, None, 2000, None, None, 1, (28, 28)),
    "landsat": (4435, None, 2000, [1072, 479, 961, 415, 470, 1038], [461, 224, 397, 211, 237, 470], 4, (3, 3)),
}


def test_registry_is_complete():
    assert set(IMAGE_DATASETS) == set(EXPECTED)
    for info in IMAGE_DATASETS.values():
        assert info.metric in {"auroc", "accuracy", "macro_f1"}
        assert info.license and info.origin.startswith(("http", "MedMNIST")) and info.domain
    assert {n for n, i in IMAGE_DATASETS.items() if i.metric == "auroc"} == {"pneumoniamnist", "breastmnist"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_splits_shapes_and_class_counts(data_dir, name):
    n_train, n_val, n_test, train_counts, test_counts, channels, hw = EXPECTED[name]
    data = load_image_classification(name, data_dir=data_dir)
    assert isinstance(data, ImageClassificationData)
    carved = n_val is None
    n_val = round(n_train * 0.1) if carved else n_val
    train_rows = n_train - n_val if carved else n_train
    assert data.sizes == {"train": train_rows, "validation": n_val, "test": n_test}
    for split, n in (("train", train_rows), ("validation", n_val), ("test", n_test)):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        assert images.shape == (n, channels, *hw) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) == data.num_labels - 1
    assert data.channels == channels and data.num_labels == len(data.label_names)
    if test_counts is not None:
        assert data.test_labels.bincount().tolist() == test_counts
    if train_counts is not None:
        counts = data.train_labels.bincount(minlength=data.num_labels)
        if carved:  # the carve-out is stratified: each class gives its share, within rounding
            val_counts = data.validation_labels.bincount(minlength=data.num_labels)
            assert (counts + val_counts).tolist() == train_counts
            assert np.all(np.abs(val_counts.numpy() - np.array(train_counts) * 0.1) <= 1)
        else:
            assert counts.tolist() == train_counts


def test_pneumoniamnist_splits_are_the_official_ones(data_dir):
    data = load_image_classification("pneumoniamnist", data_dir=data_dir)
    with np.load(data_dir / "medical" / "pneumoniamnist" / "pneumoniamnist.npz") as npz:
        for split, official in (("validation", "val"), ("test", "test")):
            images, labels = data.split(split)
            assert np.array_equal(images[:, 0].numpy(), npz[f"{official}_images"])
            assert np.array_equal(labels.numpy(), npz[f"{official}_labels"].ravel())
    assert data.label_names == ["normal", "pneumonia"]


def _mnist_raw(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = data_dir / "vision" / "mnist_t10k"
    images = np.frombuffer(gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes()),
                           np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()),
                           np.uint8, offset=8)
    return images, labels


def test_mnist_resplit_is_a_stratified_deterministic_partition(data_dir):
    a = load_image_classification("mnist", data_dir=data_dir)
    b = load_image_classification("mnist", data_dir=data_dir)
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.validation_labels, b.validation_labels)
    images, labels = _mnist_raw(data_dir)
    assert len(labels) == 10_000 and sum(a.sizes.values()) == 10_000
    # The three parts together are exactly the 10,000 digits: the same multiset of (image, label).
    rebuilt = torch.cat([a.train_images, a.validation_images, a.test_images])[:, 0].reshape(10_000, -1).numpy()
    rebuilt_labels = torch.cat([a.train_labels, a.validation_labels, a.test_labels]).numpy()
    original = images.reshape(10_000, -1)
    assert _pairs(rebuilt, rebuilt_labels) == _pairs(original, labels)
    # Stratified: each digit's test share is its share of the whole, within rounding.
    whole = np.bincount(labels, minlength=10)
    test_counts = a.test_labels.bincount(minlength=10).numpy()
    assert np.all(np.abs(test_counts - whole * MNIST_TEST_SIZE / 10_000) < 1)


def _pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted(zip(labels.tolist(), map(bytes, images)))


def test_subsampling_is_seeded_and_deterministic(data_dir):
    options = SplitOptions(max_train_samples=300, max_eval_samples=50)
    a = load_image_classification("mnist", data_dir=data_dir, options=options)
    b = load_image_classification("mnist", data_dir=data_dir, options=options)
    assert a.train_images.shape == (300, 1, 28, 28) and a.validation_images.shape == (50, 1, 28, 28)
    assert a.test_images.shape == (50, 1, 28, 28)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.validation_labels, b.validation_labels)
    # A subsample holds rows of the full split, with their own labels.
    full = load_image_classification("mnist", data_dir=data_dir)
    for split in ("train", "test"):
        flat = {bytes(img.numpy()): int(y) for img, y in zip(*full.split(split) if split == "test"
                                                              else (full.train_images, full.train_labels))}
        pairs = a.split(split) if split == "test" else (a.train_images, a.train_labels)
        assert all(flat[bytes(img.numpy())] == int(y) for img, y in zip(*pairs))
    # Limits above the split size keep the whole split.
    big = load_image_classification("breastmnist", data_dir=data_dir, options=SplitOptions(max_train_samples=10_000))
    assert len(big.train_labels) == 546


def test_landsat_reshape_matches_raw_rows(data_dir):
    data = load_image_classification("landsat", data_dir=data_dir)
    folder = data_dir / "remote_sensing" / "statlog_landsat"
    first = [int(v) for v in (folder / "sat.trn").read_text().splitlines()[0].split()]
    # UCI order: pixel by pixel (row-major), the 4 bands of a pixel together.
    image = data.train_images[0]
    for pixel in range(9):
        row, col = divmod(pixel, 3)
        assert image[:, row, col].tolist() == first[4 * pixel: 4 * pixel + 4]
    assert first[:4] == [92, 115, 120, 94] and image[:, 0, 0].tolist() == [92, 115, 120, 94]
    assert data.label_names[int(data.train_labels[0])] == "grey soil" and first[36] == 3
    last = [int(v) for v in (folder / "sat.tst").read_text().splitlines()[-1].split()]
    assert data.test_images[-1].permute(1, 2, 0).reshape(-1).tolist() == last[:36]
    codes = (1, 2, 3, 4, 5, 7)
    assert codes[int(data.test_labels[-1])] == last[36]
    # Neighbouring rows are overlapping windows: the next row's top-left pixel is often this
    # row's top-middle. True for the first two rows of sat.trn, and only with band-last order.
    assert data.train_images[1][:, 0, 0].tolist() == data.train_images[0][:, 0, 1].tolist()


def test_missing_data_dir_names_env_var_and_origin(monkeypatch):
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    with pytest.raises(UserError, match=r"PEFTLAB_DATA_DIR.*medmnist"):
        load_image_classification("pneumoniamnist")


def test_data_dir_without_the_dataset(tmp_path):
    with pytest.raises(UserError, match=r"not found at .*PEFTLAB_DATA_DIR.*ylecun/mnist"):
        load_image_classification("mnist", data_dir=tmp_path)


def test_env_var_is_used(data_dir, monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    assert len(load_image_classification("breastmnist").test_labels) == 156


@pytest.mark.parametrize("kwargs, message", [
    ({"max_train_samples": 0}, "max_train_samples must be at least 1"),
    ({"max_eval_samples": -1}, "max_eval_samples must be at least 1"),
    ({"validation_fraction": 1.0}, "validation_fraction must be between 0 and 1"),
])
def test_bad_limits(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_image_classification("mnist", data_dir=tmp_path, options=SplitOptions(**kwargs))


def test_unknown_name():
    with pytest.raises(UserError, match=r"unknown image dataset 'cifar'.*pneumoniamnist"):
        load_image_classification("cifar")


def test_broken_files_are_user_errors(tmp_path):
    (tmp_path / "vision" / "mnist_t10k").mkdir(parents=True)
    (tmp_path / "vision" / "mnist_t10k" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        load_image_classification("mnist", data_dir=tmp_path)
    (tmp_path / "medical" / "breastmnist").mkdir(parents=True)
    (tmp_path / "medical" / "breastmnist" / "breastmnist.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        load_image_classification("breastmnist", data_dir=tmp_path)
    folder = tmp_path / "remote_sensing" / "statlog_landsat"
    folder.mkdir(parents=True)
    (folder / "sat.trn").write_text(" ".join(["1"] * 36) + " 6\n")
    with pytest.raises(UserError, match=r"unknown class codes \[6\]"):
        load_image_classification("landsat", data_dir=tmp_path)


def test_npz_missing_eval_split(data_dir, tmp_path):
    folder = tmp_path / "medical" / "pneumoniamnist"
    folder.mkdir(parents=True)
    with np.load(data_dir / "medical" / "pneumoniamnist" / "pneumoniamnist.npz") as npz:
        np.savez(folder / "pneumoniamnist.npz", train_images=npz["train_images"][:5],
                 train_labels=npz["train_labels"][:5], val_images=npz["val_images"][:5],
                 val_labels=npz["val_labels"][:5])
    with pytest.raises(UserError, match="no 'test_images'/'test_labels'"):
        load_image_classification("pneumoniamnist", data_dir=tmp_path)


@pytest.fixture
def file_server(data_dir):
    """A real HTTP server on 127.0.0.1 serving the data folder, standing in for a public origin."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _online(monkeypatch, tmp_path, name: str, base_url: str) -> None:
    import dataclasses

    from peftlab.workers import image_data

    info = image_data.IMAGE_DATASETS[name]
    downloads = tuple((f, f"{base_url}/{info.folder}/{f}") for f, _ in info.downloads)
    monkeypatch.setitem(image_data.IMAGE_DATASETS, name, dataclasses.replace(info, downloads=downloads))
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_without_a_local_copy_the_files_are_downloaded_once(file_server, monkeypatch, tmp_path):
    server, url = file_server
    _online(monkeypatch, tmp_path, "breastmnist", url)
    assert len(load_image_classification("breastmnist").test_labels) == 156
    assert (tmp_path / "peftlab" / "datasets" / "medical" / "breastmnist" / "breastmnist.npz").is_file()
    server.shutdown()  # the second load reads the cache, not the network
    assert len(load_image_classification("breastmnist").train_labels) == 546


def test_a_failed_download_is_one_line_and_leaves_no_file(monkeypatch, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    _online(monkeypatch, tmp_path, "mnist", closed)
    with pytest.raises(UserError, match=r"needs a local copy.*downloading http://127\.0\.0\.1:\d+/.* failed"):
        load_image_classification("mnist")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
