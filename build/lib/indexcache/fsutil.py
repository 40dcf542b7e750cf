"""Filesystem helpers shared by the resume checkpoints and the export: durability and an exclusive lock."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write_text", "dir_lock", "fsync_dir"]

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (files created or renamed in it) to disk, so they survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on directory `path` (flock on the directory itself) for the block.

    Locking the directory rather than a lock file leaves nothing behind after a kill, and the kernel drops the lock
    with the process. Filesystems without flock on directories (some network mounts) go unlocked, with a warning:
    the lock only guards against two writers in the same directory at once.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            logger.warning("cannot lock %s (%s): continuing without the lock", path, err)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
