"""Image data: IDX parsing, digits and Fashion-MNIST splits, integer-image checks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.data.images import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    check_images,
    load_digits_images,
    load_fashion_mnist,
    load_images,
    read_idx,
)

HAVE_FASHION = all((FASHION_MNIST_DIR / n).is_file() for f in FASHION_MNIST_FILES.values() for n in f)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips_a_hand_written_file(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_read_idx_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"\x50\x4b\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "b")


def test_fashion_mnist_from_a_small_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("test", 7)):
        images, labels = FASHION_MNIST_FILES[part]
        write_idx(tmp_path / images, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / labels, rng.integers(0, 10, n))
    splits = load_fashion_mnist(tmp_path, n_val=10, seed=3)
    assert splits.train.shape == (20, 1, 28, 28) and splits.val.shape == (10, 1, 28, 28)
    assert splits.test.shape == (7, 1, 28, 28) and splits.levels == 256
    assert splits.train.dtype == torch.int64 and splits.train_labels.shape == (20,)
    # the validation images come from the training file, each exactly once
    train_file = torch.from_numpy(read_idx(tmp_path / FASHION_MNIST_FILES["train"][0]).astype(np.int64))
    rows = torch.cat([splits.train, splits.val])[:, 0].reshape(30, -1)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, train_file.reshape(30, -1).tolist()))
    again = load_fashion_mnist(tmp_path, n_val=10, seed=3)
    assert torch.equal(again.val, splits.val)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_installed() -> None:
    splits = load_images("fashion-mnist")
    assert splits.train.shape == (50_000, 1, 28, 28) and splits.val.shape == (10_000, 1, 28, 28)
    assert splits.test.shape == (10_000, 1, 28, 28)
    assert int(splits.train.max()) == 255 and int(splits.train.min()) == 0
    assert set(splits.test_labels.unique().tolist()) == set(range(10))


def test_digits_images_split_is_fixed_and_disjoint() -> None:
    splits = load_digits_images(seed=0)
    assert splits.shape == (1, 8, 8) and splits.levels == 17
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [1438, 179, 180]
    from sklearn.datasets import load_digits

    flat = torch.cat([splits.train, splits.val, splits.test]).reshape(-1, 64)
    assert sorted(map(tuple, flat.tolist())) == sorted(map(tuple, load_digits().data.astype(int).tolist()))
    assert torch.equal(load_digits_images(seed=0).test, splits.test)
    assert not torch.equal(load_digits_images(seed=1).test, splits.test)


def test_unknown_image_dataset() -> None:
    with pytest.raises(ValueError, match="unknown image dataset 'mnist'"):
        load_images("mnist")


def test_check_images() -> None:
    assert check_images(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)) == 256
    assert check_images(torch.tensor([[[[0, 16]]]])) == 17
    with pytest.raises(ValueError, match=r"shape \(n, C, H, W\); got shape \(2, 64\)"):
        check_images(torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"integers in \[0, 4\).*\[0, 7\]"):
        check_images(torch.tensor([[[[0, 7]]]]), levels=4)
    with pytest.raises(TypeError, match="integer pixel values"):
        check_images(torch.full((1, 1, 2, 2), 0.5))


def test_digits_images_have_the_rows_of_the_vector_digits_split() -> None:
    from cnf.data.real import load_real

    images, vectors = load_digits_images(seed=0), load_real("digits", dtype=torch.float64)
    for part in ("train", "val", "test"):
        flat = getattr(images, part).reshape(-1, 64).double()
        assert torch.equal(flat, getattr(vectors, part)), part
