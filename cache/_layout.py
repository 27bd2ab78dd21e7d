"""Where a store's parts live under its root: the blob files, partial downloads, and the index
(a diskcache directory). The one place these names are spelled: a command that checks a path
is a store, a start that checks it may write there, and every opener of the index ask here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["BLOBS_DIR", "TMP_DIR", "index_dir", "index_files", "is_store"]

BLOBS_DIR: Final = "blobs"
TMP_DIR: Final = "tmp"
INDEX_DIR: Final = "index"
#: diskcache's database file in the index directory.
INDEX_DATABASE: Final = "cache.db"


def index_dir(root: Path) -> Path:
    return root / INDEX_DIR


def index_files(root: Path) -> tuple[Path, Path]:
    """The index's directory and its database file: what a daemon must be able to write."""
    return root / INDEX_DIR, root / INDEX_DIR / INDEX_DATABASE


def is_store(root: Path) -> bool:
    """Whether ``root`` holds a store (made by the first ``moorage serve`` on it). Blocks."""
    return (root / INDEX_DIR).is_dir() and (root / BLOBS_DIR).is_dir()
