"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

_TEMP_SUFFIX = ".tmp"  # atomic_write's temporaries: .NAME.XXXXXXXX.tmp next to NAME


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls `write(tmp_path)`, fsyncs the result, then renames it over `path`.

    A crash at any moment leaves either the previous `path` or the complete new one (POSIX rename is atomic
    within a file system); a failed write removes its temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so colleagues on a shared
        # cluster can read checkpoints and logs as before.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files `atomic_write` leaves behind when its process is killed mid-write
    (`.NAME.XXXXXXXX.tmp`, whose target NAME they never replaced). Call it when resuming into `folder`, where no
    other writer is running. Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        if tmp.is_file():
            try:
                tmp.unlink()
            except OSError:
                continue
            removed.append(tmp)
    return removed
