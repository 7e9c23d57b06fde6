"""Atomic file replacement: readers see the old file or the new one, never a torn one.

New content goes to a hidden ``.<name>.<random>.partial`` file in the destination folder, is fsynced,
then renamed onto the destination. A process killed mid-write leaves at most such a temp file, which
no ``*.nii.gz``/``*.json`` pattern matches and `remove_partials` cleans up.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def fsync(handle: IO[Any]) -> None:
    """Flush Python's buffer and the OS cache of an open file to disk."""
    handle.flush()
    os.fsync(handle.fileno())


def _create_temp(destination: Path) -> tuple[int, str]:
    """A new hidden temp file beside ``destination``, with the permissions ``open()`` would give it (umask)."""
    for _ in range(100):
        tmp = destination.parent / f".{destination.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {destination}")


@contextmanager
def staged(destination: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """An open temp file beside ``destination``, renamed onto it when the block exits without error.

    The rename happens after the block, so a caller can make other changes durable between writing
    the new content and exposing it (write-ahead ordering); on error the temp file is removed.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(destination)
    try:
        with os.fdopen(fd, mode) as out:
            if destination.exists():  # a replacement keeps the permissions of the file it replaces
                os.fchmod(out.fileno(), stat.S_IMODE(destination.stat().st_mode))
            yield out
            fsync(out)
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_copy(source: str | Path, destination: str | Path) -> Path:
    """Copy ``source`` onto ``destination`` atomically."""
    with staged(destination) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out)
    return Path(destination)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with staged(path, "w") as out:
        out.write(text)
    return Path(path)


def remove_partials(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temp files crashed writers left in ``folder`` (and below); returns what was removed.

    Only call this while holding the lock every writer to ``folder`` holds, or a live write loses its file.
    """
    folder = Path(folder)
    pattern = f".*{PARTIAL_SUFFIX}"
    found = (folder.rglob(pattern) if recursive else folder.glob(pattern)) if folder.is_dir() else []
    removed = sorted(p for p in found if p.is_file())
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checksums of downloads, published models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
