"""Real datasets that need no internet: scikit-learn's bundled tables and pzflow's galaxies.

Each dataset comes with one fixed split (:data:`SPLIT_FRACTIONS` of the rows, shuffled with
:data:`SPLIT_SEED` by :func:`cnf.data.split`), so every model, benchmark and CLI run sees the
same training, validation and test rows.

============== ======== ====== ====================================================== ==========
name           rows     dims   source                                                 licence
============== ======== ====== ====================================================== ==========
digits         1,797    64     UCI optical digits 8x8, values 0..16 (scikit-learn)    CC BY 4.0
wine           178      13     UCI wine, chemical analysis (scikit-learn)              CC BY 4.0
breast_cancer  569      30     UCI breast cancer Wisconsin diagnostic (scikit-learn)   CC BY 4.0
galaxies       100,000  7      redshift + LSST ugrizy magnitudes of Buzzard mock       MIT (pzflow)
                               galaxies (DeRose et al. 2019), as shipped in pzflow
============== ======== ====== ====================================================== ==========

The scikit-learn tables need ``pip install "cnf-flows[data]"``. The galaxy table is read from
the ``pzflow`` package files without importing pzflow (which needs JAX): install the wheel
alone with ``pip install --no-deps pzflow``, or point ``path=`` (or the ``CNF_GALAXY_DATA``
environment variable) at the wheel, its unpacked folder or ``galaxy-data.pkl``. That file is a
pickled pandas DataFrame; it is **never unpickled**: :func:`read_galaxy_pickle` walks its opcodes
with :func:`pickletools.genops` (which executes nothing), checks the expected structure and
reads the one float64 block with :func:`numpy.frombuffer`.
"""

from __future__ import annotations

import importlib.util
import os
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnf.data.checks import _check_dtype
from cnf.data.files import split

REAL_DATASETS: tuple[str, ...] = ("digits", "wine", "breast_cancer", "galaxies")
"""Names accepted by :func:`load_real` (and by ``--data`` in the CLI)."""

#: Integer levels of the discrete datasets (every value is one of 0..levels-1).
LEVELS: dict[str, int] = {"digits": 17}

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0

GALAXY_COLUMNS = ("redshift", "u", "g", "r", "i", "z", "y")
GALAXY_MEMBER = "pzflow/example_files/galaxy-data.pkl"
#: SHA-256 of galaxy-data.pkl in pzflow 4.0.0 (the file this reader was written against).
GALAXY_SHA256 = "203cc8b95e55e732f2a550f5e2c16afc633bf9aac10bde6d865c087cb6168970"
GALAXY_ENV = "CNF_GALAXY_DATA"

LICENCES = {
    "digits": "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits, Alpaydin & Kaynak 1998)",
    "wine": "CC BY 4.0 (UCI Wine, Aeberhard & Forina 1991)",
    "breast_cancer": "CC BY 4.0 (UCI Breast Cancer Wisconsin Diagnostic, Wolberg, Street & Mangasarian 1995)",
    "galaxies": "MIT (pzflow, J. F. Crenshaw; Buzzard mock catalogue, DeRose et al. 2019)",
}

_INSTALL_DATA = 'pip install "cnf-flows[data]"'
_INSTALL_PZFLOW = "pip install --no-deps pzflow"


@dataclass(frozen=True)
class RealDataset:
    """One dataset with its fixed split.

    ``levels`` is the number of integer values 0..levels-1 that every entry takes (17 for
    digits), or None for continuous data.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    columns: tuple[str, ...]
    levels: int | None
    licence: str

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])


def _sklearn_table(name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        from sklearn import datasets
    except ImportError as error:
        raise ImportError(
            f"the {name!r} dataset is bundled with scikit-learn, which is not installed: {_INSTALL_DATA}"
        ) from error
    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    bunch = loader()
    return np.asarray(bunch.data, dtype=np.float64), tuple(str(c) for c in bunch.feature_names)


def read_galaxy_pickle(raw: bytes) -> np.ndarray:
    """The (rows, 7) float64 table of pzflow's galaxy-data.pkl, read without unpickling.

    The file is a pandas DataFrame with one float64 block of shape (7, rows) stored as raw
    little-endian bytes. The opcodes are only listed (:func:`pickletools.genops` runs nothing);
    the column names, the dtype, the row count and the size of the one large byte string must
    all be as expected, otherwise a ValueError says what differed.
    """
    strings: list[str] = []
    ints: list[int] = []
    blobs: list[bytes] = []
    try:
        for opcode, arg, _ in pickletools.genops(raw):
            if isinstance(arg, str):
                strings.append(arg)
            elif isinstance(arg, int) and not isinstance(arg, bool):
                ints.append(arg)
            elif isinstance(arg, (bytes, bytearray)) and opcode.name.startswith(
                ("BINBYTES", "SHORT_BINBYTES")
            ):
                blobs.append(bytes(arg))
    except Exception as error:  # pickletools raises ValueError and others on a damaged stream
        raise ValueError(f"galaxy data is not a readable pickle stream: {error}") from error
    names = list(GALAXY_COLUMNS)
    runs = [i for i in range(len(strings) - len(names) + 1) if strings[i : i + len(names)] == names]
    if not runs:
        raise ValueError(f"galaxy data does not list the columns {GALAXY_COLUMNS}")
    if "f8" not in strings or "<" not in strings:
        raise ValueError("galaxy data is not stored as little-endian float64 ('<f8')")
    large = [b for b in blobs if len(b) > 64]
    if len(large) != 1:
        raise ValueError(f"galaxy data should hold one float64 block, found {len(large)} large byte strings")
    block = large[0]
    rows = len(block) // (8 * len(names))
    if rows * 8 * len(names) != len(block) or rows not in ints:
        raise ValueError(
            f"galaxy data block of {len(block)} bytes does not match {len(names)} float64 columns "
            f"and a stored row count"
        )
    # The block is the DataFrame's values transposed: one row per column, C order.
    return np.frombuffer(block, dtype="<f8").reshape(len(names), rows).T.astype(np.float64)


def _galaxy_bytes(path: str | os.PathLike[str] | None) -> bytes:
    source = path if path is not None else os.environ.get(GALAXY_ENV)
    if source is None:
        spec = importlib.util.find_spec("pzflow")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the 'galaxies' dataset is read from the pzflow package files (never imported); "
                f"install them without JAX: {_INSTALL_PZFLOW}, or pass path= / set {GALAXY_ENV} to "
                "a pzflow wheel, its folder or galaxy-data.pkl"
            )
        source = Path(next(iter(spec.submodule_search_locations))).parent
    source = Path(source)
    if source.is_dir():
        source = source / GALAXY_MEMBER
    if not source.exists():
        raise FileNotFoundError(f"galaxy data not found at {str(source)!r}")
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            try:
                return wheel.read(GALAXY_MEMBER)
            except KeyError:
                raise FileNotFoundError(f"{str(source)!r} has no {GALAXY_MEMBER}") from None
    return source.read_bytes()


def galaxy_table(path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """pzflow's 100,000 x 7 galaxy table (redshift, u, g, r, i, z, y), without pandas or JAX."""
    return read_galaxy_pickle(_galaxy_bytes(path))


def real_table(
    name: str, *, path: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The whole table of dataset ``name`` as float64 and its column names (before splitting)."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown real dataset {name!r}; choose one of {', '.join(REAL_DATASETS)}")
    if name == "galaxies":
        return galaxy_table(path), GALAXY_COLUMNS
    return _sklearn_table(name)


def load_real(
    name: str, *, dtype: torch.dtype = torch.float32, path: str | os.PathLike[str] | None = None
) -> RealDataset:
    """Dataset ``name`` split into train / validation / test by the fixed seed (see module doc)."""
    dtype = _check_dtype(dtype)
    table, columns = real_table(name, path=path)
    data = torch.from_numpy(table)
    train, val, test = split(data, SPLIT_FRACTIONS, SPLIT_SEED)
    levels = LEVELS.get(name)
    return RealDataset(
        name=name,
        train=train.to(dtype),
        val=val.to(dtype),
        test=test.to(dtype),
        columns=columns,
        levels=levels,
        licence=LICENCES[name],
    )
