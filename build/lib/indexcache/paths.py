"""Where indexcache keeps what it derives once and reuses (converted checkpoints, tiny models): one rule."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "INDEXCACHE_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/indexcache")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: the argument (`model.cache_dir`), else $INDEXCACHE_CACHE, else ~/.cache/indexcache."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
    return Path(root).expanduser()
