"""Writing a run's files safely: durable atomic writes, no symlink following, one writer per folder.

Every file of a run (checkpoint, log, summary) is written through a temporary file with a
unique name in the same folder, opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name planted
in advance, or a symlink, makes the open fail instead of writing through it), flushed and
``fsync``-ed, then renamed over the target with ``os.replace`` (which replaces a symlink itself,
never its target). A reader therefore sees the old file or the new one, never a mixture, and a
crash or ``kill -9`` leaves at most a stale temporary file. :class:`RunLock` makes a second
process that writes into the same folder fail at once with a clear message.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; released by the kernel when the holder dies (kill -9 included)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock is skipped
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".cnf-run.lock"


def _describe(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the device while writing {str(path)!r}; free some space and try again"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {str(path)!r}"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {str(path)!r}: {error.strerror} (is the folder read-only?)"
    if error.errno == errno.ELOOP:
        return f"refusing to write {str(path)!r} through a symbolic link"
    return f"cannot write {str(path)!r}: {error.strerror or error}"


def _open_exclusive(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:  # pragma: no cover - some file systems cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` durably and atomically (see the module docstring).

    Raises :class:`OSError` whose message names ``path`` and the cause (a full disk, a
    read-only folder); the previous content of ``path`` is then untouched.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {str(path)!r}: it is a folder")
    tmp = temp_name(path)
    try:
        fd = _open_exclusive(tmp, os.O_WRONLY)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, _describe(error, path)) from error
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to ``path`` without following a symlink (the log of a run)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        try:
            _write_all(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as error:
        raise OSError(error.errno, _describe(error, path)) from error


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left by a killed writer (call with the folder's lock held)."""
    removed = []
    for stale in folder.glob(f".*{TEMP_SUFFIX}"):
        if stale.is_file() or stale.is_symlink():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float (nested in dicts/lists) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON text that any parser accepts: non-finite floats become ``null`` (never ``Infinity``)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def prepare_folder(folder: str | os.PathLike[str], name: str = "out") -> Path:
    """Create ``folder`` if needed and check it is a writable folder; clear errors otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"{name} {str(folder)!r} is a file, not a folder; choose a folder for the run"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno == errno.ENOTDIR or error.errno == errno.EEXIST:
            raise NotADirectoryError(
                errno.ENOTDIR, f"{name} {str(folder)!r} cannot be created: part of its path is a file"
            ) from error
        raise OSError(error.errno, f"{name} {str(folder)!r} cannot be created: {error.strerror}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{name} {str(folder)!r} is not writable; choose another folder")
    return folder


class RunLock:
    """An exclusive lock on a run folder (``<folder>/.cnf-run.lock``, ``flock``).

    A second writer fails at once with a message naming the folder and the holder's pid. The
    kernel releases the lock when the holder exits or is killed, so no stale lock survives.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:  # pragma: no cover
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError as error:
            raise OSError(error.errno, _describe(error, self.path)) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RuntimeError(
                    f"another process (pid {holder}) is writing to {str(self.folder)!r}; wait for it to "
                    "finish or choose another output folder"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
