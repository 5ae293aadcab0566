"""Whitening y = W (x - mean) with W = Cov^(-1/2) of the training data (ZCA).

After whitening, the training data have mean 0 and identity covariance, so a flow whose base
is N(0, I) starts out as the full-covariance Gaussian fit of the data and only has to learn
what is not Gaussian. log|det dy/dx| = log|det W| = -1/2 sum log(eigenvalues of Cov).
ZCA (W symmetric) rather than a Cholesky factor keeps each output coordinate tied to its input
coordinate (Bell & Sejnowski 1997; Kessy, Lewin & Strimmer 2018, "Optimal whitening"). When the
covariance's eigenvalues span more than 1 / EIGENVALUE_FLOOR (columns on very different scales),
ZCA-cor is used instead: the correlation matrix P is whitened, W = P^(-1/2) diag(1 / std), so
that the floor on near-constant directions is relative to unit-variance columns.
"""

from __future__ import annotations

from typing import Any

import torch

from cnf.transforms.base import Transform, check_sample_batch

#: Eigenvalues below this fraction of the largest are raised to it (near-constant directions).
EIGENVALUE_FLOOR = 1e-6


class Whiten(Transform):
    """y = (x - mean) @ matrix.T on flattened samples, log|det| = log|det matrix|."""

    kind = "whiten"

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        super().__init__()
        mean, matrix = torch.as_tensor(mean), torch.as_tensor(matrix)
        size = mean.numel()
        if matrix.shape != (size, size):
            raise ValueError(
                f"matrix must be square with the size of one sample ({size}), got shape {tuple(matrix.shape)}"
            )
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(matrix).all())):
            raise ValueError("mean and matrix must be finite")
        sign, logdet = torch.linalg.slogdet(matrix.double())
        if sign == 0 or not torch.isfinite(logdet):
            raise ValueError("matrix must be invertible")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("matrix", matrix.detach().clone())
        self.register_buffer("inverse_matrix", torch.linalg.inv(matrix.double()).to(matrix.dtype))
        self.register_buffer("logdet", logdet.to(matrix.dtype))

    @classmethod
    def fit(cls, data: torch.Tensor, *, name: str = "data") -> Whiten:
        """ZCA whitening from the training ``data`` (n, ...): statistics of flattened samples."""
        check_sample_batch(data, name)
        flat = data.detach().double().reshape(data.shape[0], -1)
        if flat.shape[0] < 2:
            raise ValueError(
                f"{name} must have at least 2 rows to estimate a covariance, got {flat.shape[0]}"
            )
        mean = flat.mean(dim=0)
        centred = flat - mean
        cov = centred.T @ centred / flat.shape[0]
        eigenvalues, vectors = torch.linalg.eigh(cov)
        scale = None
        if eigenvalues.min() < EIGENVALUE_FLOOR * eigenvalues.max():
            # Columns on very different scales (breast cancer: variances 1e-7 ... 1e5) make the
            # floor bite on directions that are well determined: whiten the correlation matrix.
            scale = cov.diagonal().sqrt()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            eigenvalues, vectors = torch.linalg.eigh(cov / torch.outer(scale, scale))
        floor = EIGENVALUE_FLOOR * eigenvalues.max().clamp_min(1e-300)
        eigenvalues = eigenvalues.clamp_min(floor)
        matrix = vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T
        if scale is not None:
            matrix = matrix / scale  # ZCA-cor: P^(-1/2) diag(1 / std) (Kessy et al. 2018)
        return cls(mean.reshape(data.shape[1:]).to(data.dtype), matrix.to(data.dtype))

    def _check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.shape[1:] != self.mean.shape:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} does not fit Whiten statistics of samples shaped "
                f"{tuple(self.mean.shape)}"
            )

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_sample_batch(x)
        self._check_shape(x, "x")
        flat = (x - self.mean).reshape(x.shape[0], -1)
        y = (flat @ self.matrix.T).reshape(x.shape)
        return y, self.logdet.to(x.dtype).expand(x.shape[0]).clone()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_sample_batch(y, "y")
        self._check_shape(y, "y")
        flat = y.reshape(y.shape[0], -1) @ self.inverse_matrix.T
        return flat.reshape(y.shape) + self.mean

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mean": self.mean.detach().cpu().clone(),
            "matrix": self.matrix.detach().cpu().clone(),
        }
