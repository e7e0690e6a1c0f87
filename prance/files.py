"""Safe file output: atomic writes and an early check that an output folder is writable.

Every file prance produces (checkpoints, JSON results) goes through :func:`atomic_write`, so
a crash or a kill mid-write leaves the previous file intact, never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

from prance.errors import PranceError


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)``: temporary file in the same folder, fsync, rename.

    Temporary files left by an earlier writer that was killed are removed afterwards.
    OSErrors propagate; callers turn them into messages that fit their file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for stale in directory.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_dir(directory: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create ``directory`` if needed and prove it is writable by creating a temporary file in it."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise PranceError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".prance-write-test-"):
            pass
    except OSError as e:
        raise PranceError(f"cannot write to folder {path} ({e.strerror or e}); choose a writable {flag}") from None
    return path


@contextmanager
def removed_if_left_empty(folders: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """On failure, remove those of ``folders`` (and their parents) that did not exist before and are still empty.

    Commands create their output folder early, to prove it writable before any long work; a
    command that then fails on its input must not leave that new, empty folder behind.
    Folders that existed before, or that hold anything, are never touched.
    """
    new: set[Path] = set()
    for folder in folders:
        path = Path(os.path.abspath(folder))
        while not path.exists() and path != path.parent:
            new.add(path)
            path = path.parent
    try:
        yield
    except BaseException:
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):  # children before parents
            try:
                path.rmdir()  # only succeeds on an empty folder
            except OSError:
                pass
        raise


def recorded_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as a file records it for later commands: absolute (a ``timm:`` prefix kept), so that
    the pipeline a checkpoint names (its meta-network, teacher, adaptive model) is found again from
    any working folder; None stays None."""
    if path is None:
        return None
    text = os.fspath(path)
    prefix = "timm:" if text.startswith("timm:") else ""
    return prefix + os.path.abspath(text.removeprefix(prefix))


def load_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in the existing file ``path``, or one error line naming ``what`` it holds."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PranceError(f"{what} {path} is not valid YAML ({type(e).__name__}); fix its syntax") from None

