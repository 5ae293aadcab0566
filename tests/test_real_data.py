"""Real datasets: shapes, fixed splits and seeds, the galaxy table read without unpickling."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.data import real

SKLEARN_SHAPES = {"digits": (1797, 64), "wine": (178, 13), "breast_cancer": (569, 30)}
PZFLOW_WHEEL = Path("/tmp/pz/pzflow-4.0.0-py3-none-any.whl")


@pytest.mark.parametrize("name", sorted(SKLEARN_SHAPES))
def test_sklearn_datasets_have_fixed_disjoint_splits(name: str) -> None:
    pytest.importorskip("sklearn")
    rows, dim = SKLEARN_SHAPES[name]
    data = real.load_real(name, dtype=torch.float64)
    sizes = [part.shape[0] for part in (data.train, data.val, data.test)]
    assert sum(sizes) == rows and data.dim == dim and len(data.columns) == dim
    assert sizes[0] == round(0.8 * rows) and sizes[1] == round(0.9 * rows) - sizes[0]
    table, _ = real.real_table(name)
    everything = torch.cat([data.train, data.val, data.test]).numpy()
    # Every row appears exactly once: the split is a permutation of the table.
    np.testing.assert_array_equal(np.sort(everything, axis=0), np.sort(table, axis=0))
    again = real.load_real(name, dtype=torch.float64)
    assert torch.equal(again.train, data.train) and torch.equal(again.test, data.test)
    assert data.licence.startswith("CC BY 4.0")


def test_digits_are_seventeen_integer_levels() -> None:
    pytest.importorskip("sklearn")
    data = real.load_real("digits")
    assert data.levels == 17
    assert torch.equal(data.train, data.train.round()) and data.train.min() == 0 and data.train.max() == 16


def galaxy_like_pickle(table: np.ndarray) -> bytes:
    """A pickle with the parts the reader looks for (names, '<f8', row count, one block)."""
    block = np.ascontiguousarray(table.T, dtype="<f8").tobytes()
    return pickle.dumps(
        {"columns": list(real.GALAXY_COLUMNS), "dtype": ("f8", "<"), "rows": table.shape[0], "block": block},
        protocol=4,
    )


def test_galaxy_reader_extracts_the_block_without_unpickling() -> None:
    table = np.random.default_rng(0).normal(size=(300, 7))
    np.testing.assert_array_equal(real.read_galaxy_pickle(galaxy_like_pickle(table)), table)
    broken = pickle.dumps({"columns": ["a", "b"], "block": b"x" * 100}, protocol=4)
    with pytest.raises(ValueError, match=r"does not list the columns \('redshift'"):
        real.read_galaxy_pickle(broken)
    with pytest.raises(ValueError, match="not a readable pickle stream"):
        real.read_galaxy_pickle(b"\x80\x04garbage")


def test_galaxies_split_from_a_file(tmp_path: Path) -> None:
    table = np.random.default_rng(1).normal(size=(50, 7))
    path = tmp_path / "galaxy-data.pkl"
    path.write_bytes(galaxy_like_pickle(table))
    data = real.load_real("galaxies", path=path, dtype=torch.float64)
    assert (data.train.shape, data.val.shape, data.test.shape) == ((40, 7), (5, 7), (5, 7))
    assert data.levels is None and data.columns == real.GALAXY_COLUMNS


@pytest.mark.skipif(not PZFLOW_WHEEL.is_file(), reason="pzflow 4.0.0 wheel not downloaded")
def test_galaxies_from_the_pzflow_wheel() -> None:
    import zipfile

    raw = zipfile.ZipFile(PZFLOW_WHEEL).read(real.GALAXY_MEMBER)
    assert hashlib.sha256(raw).hexdigest() == real.GALAXY_SHA256
    table = real.galaxy_table(PZFLOW_WHEEL)
    assert table.shape == (100_000, 7)
    assert table[:, 0].min() > 0 and table[:, 0].max() < 2.3  # redshift range of the catalogue
    assert "pzflow" not in sys.modules and "jax" not in sys.modules


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(real.GALAXY_ENV, raising=False)
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps pzflow"):
        real.load_real("galaxies")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r'pip install "cnf-flows\[data\]"'):
        real.load_real("wine")
    with pytest.raises(ValueError, match="unknown real dataset 'mnist'"):
        real.load_real("mnist")
    assert os.environ.get(real.GALAXY_ENV) is None
