"""Binarised images for VAEs with Bernoulli decoders, flattened to (n, H*W).

* ``digits``: scikit-learn's 8x8 digits (CC BY 4.0), grey levels 0..16 scaled to [0, 1]; the
  fixed 80 / 10 / 10 % split of :func:`cnf.data.images.load_digits_images`.
* ``fashion-mnist``: Zalando's Fashion-MNIST (MIT licence) from the Debian package
  ``dataset-fashion-mnist``, grey levels 0..255 scaled to [0, 1]; 50,000 / 10,000 / 10,000.

Binarisation (Salakhutdinov & Murray 2008's dynamic scheme, as in the IWAE and FFJORD papers):

* training images are kept as grey intensities p in [0, 1]; the ``elbo`` objective draws a fresh
  x ~ Bernoulli(p) for every minibatch (dynamic binarisation; ``torch.bernoulli`` leaves an
  already binary image unchanged, so binary training data also work);
* validation and test images are binarised once, by Bernoulli draws from a generator seeded
  with :data:`BINARIZATION_SEED` (plus 1 for test), so every model is scored on the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnf.data.images import load_digits_images, load_fashion_mnist

BINARIZED_DATASETS = ("digits", "fashion-mnist")
BINARIZATION_SEED = 1234


@dataclass(frozen=True)
class BinarizedImages:
    """``train``: grey intensities in [0, 1] (dynamically binarised while training); ``val`` and
    ``test``: fixed binary images; all float32 of shape (n, H*W); ``shape`` is (H, W)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    shape: tuple[int, int]
    name: str


def binarize(intensities: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw of each pixel with its intensity as probability."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(intensities, generator=generator)


def load_binarized(name: str, *, seed: int | None = 0, n_train: int | None = None) -> BinarizedImages:
    """Binarised ``digits`` or ``fashion-mnist`` (see the module docstring); ``n_train`` keeps only
    the first n training images (for small budgets); ``seed`` is the split's seed."""
    if name == "digits":
        splits = load_digits_images(seed)
    elif name == "fashion-mnist":
        splits = load_fashion_mnist(seed=seed)
    else:
        raise ValueError(f"unknown binarised dataset {name!r}; choose one of {BINARIZED_DATASETS}")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise ValueError(f"n_train must be a positive int or None, got {n_train!r}")
    scale = float(splits.levels - 1)

    def flat(images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1).to(torch.float32) / scale).clamp(0, 1)

    train = flat(splits.train)[:n_train]
    val = binarize(flat(splits.val), BINARIZATION_SEED)
    test = binarize(flat(splits.test), BINARIZATION_SEED + 1)
    return BinarizedImages(train, val, test, tuple(splits.shape[1:]), name)
