"""Integer images of shape (n, C, H, W): scikit-learn's 8x8 digits and Fashion-MNIST.

Images stay integers (``torch.int64``) with a known number of grey ``levels``; dequantisation
and the logit transform are part of the model (:mod:`cnf.transforms`), so that likelihoods
are those of the discrete data and can be reported in bits per dimension.

* ``digits-images``: the 1,797 8x8 handwritten digits shipped with scikit-learn (UCI optical
  recognition of handwritten digits, CC BY 4.0), values 0..16, so 17 levels.
* ``fashion-mnist``: Zalando's Fashion-MNIST (MIT licence), 60,000 training and 10,000 test
  images of 28x28 with 256 levels, read from the gzipped IDX files that the Debian package
  ``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist``.

Reference: Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a novel image dataset for
benchmarking machine learning algorithms".
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnf.data.checks import _check_positive_int, _check_seed

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
IMAGE_DATASETS = ("digits-images", "fashion-mnist")
DIGITS_LEVELS = 17
#: Fractions of the digits split (train, validation, test), shuffled with the seed: with seed 0
#: the same rows as the vector digits of :func:`cnf.data.real.load_real` (same permutation).
DIGITS_FRACTIONS = (0.8, 0.1, 0.1)

# IDX type codes (LeCun's MNIST format): the element type of the array that follows.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSplits:
    """Train / validation / test images (int64, (n, C, H, W)), labels and the number of levels."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    levels: int
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array, no pickle involved.

    Layout: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
    per dimension and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (header {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} holds {data.size} values but its header says shape {shape}")
    return data.reshape(shape)


def _validation_split(
    images: torch.Tensor, labels: torch.Tensor, n_val: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    perm = torch.randperm(images.shape[0], generator=generator)
    val, train = perm[:n_val], perm[n_val:]
    return images[train], labels[train], images[val], labels[val]


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, *, n_val: int = 10_000, seed: int | None = 0
) -> ImageSplits:
    """Fashion-MNIST as (n, 1, 28, 28) int64 images with 256 levels.

    The 60,000 training images are split into ``60,000 - n_val`` for training and ``n_val`` for
    validation by a permutation drawn with ``seed``; the 10,000 test images are the official
    test set. ``root`` defaults to the Debian package's folder.
    """
    n_val = _check_positive_int(n_val, "n_val")
    seed = _check_seed(seed)
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    missing = [
        name for files in FASHION_MNIST_FILES.values() for name in files if not (folder / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {str(folder)!r} (missing {', '.join(missing)}); "
            f"install it with `{INSTALL_HINT}` (Debian/Ubuntu) or pass root= a folder holding the IDX files"
        )
    arrays = {
        part: [read_idx(folder / name) for name in files] for part, files in FASHION_MNIST_FILES.items()
    }
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    if n_val >= train_images.shape[0]:
        raise ValueError(f"n_val must be smaller than the {train_images.shape[0]} training images, got {n_val}")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64)).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    train, train_y, val, val_y = _validation_split(images(train_images), labels(train_labels), n_val, seed)
    return ImageSplits(train, val, images(test_images), 256, train_y, val_y, labels(test_labels), "fashion-mnist")


def load_digits_images(seed: int | None = 0) -> ImageSplits:
    """scikit-learn's 8x8 digits as (n, 1, 8, 8) int64 images with 17 levels (0..16).

    Shuffled with ``seed`` and split 80 / 10 / 10 % into train / validation / test
    (1,438 / 179 / 180 images); seed 0 gives the rows of the vector digits' fixed split.
    """
    from sklearn.datasets import load_digits

    seed = _check_seed(seed)
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.int64)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return split_images(images, DIGITS_LEVELS, labels, fractions=DIGITS_FRACTIONS, seed=seed, name="digits-images")


def split_images(
    images: torch.Tensor,
    levels: int,
    labels: torch.Tensor | None = None,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int | None = 0,
    name: str = "images",
) -> ImageSplits:
    """Shuffle integer images (n, C, H, W) with ``seed`` and split them into train / val / test."""
    levels = check_images(images, levels, name)
    n = images.shape[0]
    n_train, n_val = round(fractions[0] * n), round((fractions[0] + fractions[1]) * n) - round(fractions[0] * n)
    if min(n_train, n_val, n - n_train - n_val) < 1:
        raise ValueError(f"{name} of shape {tuple(images.shape)} is too small to split {fractions}")
    labels = torch.full((n,), -1, dtype=torch.int64) if labels is None else labels
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 if seed is None else seed))
    parts = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    return ImageSplits(*(images[p] for p in parts), levels, *(labels[p] for p in parts), name)


def load_images(name: str, *, seed: int | None = 0) -> ImageSplits:
    """An image data set by name: ``digits-images`` or ``fashion-mnist``."""
    if name == "digits-images":
        return load_digits_images(seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(seed=seed)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")


def check_images(images: torch.Tensor | np.ndarray, levels: int | None = None, name: str = "images") -> int:
    """Check integer images of shape (n, C, H, W) and return their number of levels.

    Values must be integers in [0, levels); without ``levels`` it is 256 for uint8 data and
    ``max + 1`` otherwise. Raises a ValueError/TypeError naming ``name`` and echoing the shape
    or values.
    """
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a tensor or array of integer images, got {type(images).__name__}")
    tensor = torch.as_tensor(images)
    if tensor.ndim != 4 or min(tensor.shape) == 0:
        raise ValueError(f"{name} must have shape (n, C, H, W); got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point:
        if not bool(torch.isfinite(tensor).all()) or not bool((tensor == tensor.round()).all()):
            raise TypeError(f"{name} must hold integer pixel values, got non-integer {tensor.dtype} values")
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold integer pixel values, got dtype {tensor.dtype}")
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0:
        raise ValueError(f"{name} must hold non-negative integer pixel values; got values in [{low}, {high}]")
    if levels is None:
        levels = 256 if tensor.dtype == torch.uint8 else high + 1
    levels = _check_positive_int(levels, "levels")
    if levels < 2 or low < 0 or high >= levels:
        raise ValueError(f"{name} must hold integers in [0, {levels}) with levels >= 2; got values in [{low}, {high}]")
    return levels
