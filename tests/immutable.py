"""Store files out of the cache's hands, as those of another user are to a daemon, for tests
that run as root (whom permissions do not stop): the immutable attribute (``chattr +i``)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` (a file or a directory) no one may change, remove or add to while inside."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
