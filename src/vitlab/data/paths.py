"""Where datasets live: `--data DIR`, else `$VITLAB_DATA`, else a per-user cache directory."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "VITLAB_DATA"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/vitlab`, or `~/.cache/vitlab` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vitlab"


def resolve_data_dir(data: str | os.PathLike | None = None, name: str = "cifar10") -> Path:
    """The directory (or archive) to read dataset `name` from.

    An explicit `data` wins, so a command line always overrides the environment; `$VITLAB_DATA` lets CI
    and shared machines point every command at one copy; the cache dir is where a missing dataset is downloaded.
    """
    if data is not None and str(data) != "":
        return Path(data).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return cache_root() / name


def is_cache_dir(path: str | os.PathLike, name: str = "cifar10") -> bool:
    """True when `path` is vitlab's own cache directory for dataset `name` (where it may download by itself)."""
    return Path(path).expanduser().absolute() == (cache_root() / name).expanduser().absolute()
