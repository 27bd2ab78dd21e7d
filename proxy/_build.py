"""What this build is: the installed package's version, for ``--version``, the ``starting`` log
line and the ``moorage_build_info`` metric."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["package_version", "python_version"]


def package_version() -> str:
    """The installed ``moorage`` package's version; ``unknown`` when run from sources that
    were not installed."""
    try:
        return version("moorage")
    except PackageNotFoundError:
        return "unknown"


def python_version() -> str:
    return platform.python_version()
