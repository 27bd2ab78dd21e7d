"""The HTTP face: the aiohttp application, OCI pull routes, error bodies, metrics, logs, CLI.

Knows no disk layout and no upstream wire detail: it asks ``moorage.cache`` for answers (and
whether a path is a store), and ``moorage.upstreams`` for routes.
"""

from ._app import build_app
from ._metrics import Metrics
from .cli import main
from .errors import OCIError

__all__ = ["Metrics", "OCIError", "build_app", "main"]
