"""Filesystem helpers shared by the resume checkpoints and the export: durability and an exclusive lock."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "STAGING_TAG",
    "atomic_write_text",
    "dir_lock",
    "fsync_dir",
    "sibling",
    "staged_dir",
    "temp_sibling",
    "unwritable_folder",
]

STAGING_TAG = re.compile(r"[0-9a-f]{12}")  # the random part of every staging/aside name written here

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


def temp_sibling(path: Path) -> Path:
    """`.{name}.tmp-{pid}{suffix}` beside `path`, after removing what a killed writer of `path` left there.

    Callers hold the run directory (its lock) or write caches under a rename, so a stale temporary is never a live
    writer's.
    """
    for stale in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):
        stale.unlink(missing_ok=True)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old content or the new, never a torn one."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves the old file and no temporary beside it
        raise
    fsync_dir(path.parent)


def unwritable_folder(path: Path) -> Path | None:
    """The nearest existing folder on the way to `path` when it cannot be written into (None: it can)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return None if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) else probe


def sibling(final: Path, kind: str) -> Path:
    """A hidden, unique sibling of `final` (`.{name}.{kind}-{12 hex}`): same filesystem, so renames are atomic."""
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextmanager
def staged_dir(final: Path, if_exists: str = "error") -> Iterator[Path]:
    """Build a folder in a hidden temporary sibling, then rename it to `final` in one step.

    The one "write to a temporary directory, then rename" routine of the project (converted sources, cached tiny
    models, exports). Readers see no `final` or a complete one, never a half-written one; on any failure the
    temporary folder is removed. When `final` exists at the rename: "error" raises FileExistsError, "keep" keeps
    it (a concurrent writer of the same cache entry won) and drops ours, "replace" swaps ours in (the old copy is
    renamed aside first, so a failure puts it back).
    """
    if if_exists not in ("error", "keep", "replace"):
        raise ValueError(f"if_exists={if_exists!r}: use 'error', 'keep' or 'replace'")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(final, "tmp")
    staging.mkdir()
    try:
        yield staging
        fsync_dir(staging)
        _rename_into_place(staging, final, if_exists)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def _rename_into_place(staging: Path, final: Path, if_exists: str) -> None:
    if not (final.exists() or final.is_symlink()):
        try:
            os.rename(staging, final)
            return
        except OSError:
            if not final.exists():
                raise  # not a lost race: a real failure
    if if_exists == "keep":
        shutil.rmtree(staging, ignore_errors=True)
    elif if_exists == "error":
        raise FileExistsError(f"{final} already exists")
    else:
        aside = sibling(final, "old")
        os.rename(final, aside)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(aside, final)
            raise
        try:
            shutil.rmtree(aside)
        except OSError as err:  # the new folder is in place; only the old copy's space is lost
            logger.warning("replaced %s but could not delete its old copy %s: %s", final, aside, err)
