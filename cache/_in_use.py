"""What clients are using now, as the size cap sees it: manifests served for reading lately
and what they name, and content stored in the last seconds. In memory only.

An image is pulled over seconds or minutes: its manifest, then its config and layers one by
one. A size-cap pass ordered by last reads alone would remove the layers a client asks for
next, between its manifest and its next request. :class:`InUse` remembers each manifest served
for reading (a GET, not a poller's HEAD) for ``REFERENCED_SECONDS``, with what it names (parsed
once per digest, for the last ``MAX_REFERENCED_MANIFESTS``), and what was stored in the last
``RECENT_SECONDS``: a fill's readers read it as it grew, which is no read of a stored file.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Final

from moorage.upstreams.reference import Digest

from ._clock import within
from ._evict import RECENT_SECONDS
from ._gc import parts

__all__ = ["MAX_REFERENCED_MANIFESTS", "REFERENCED_SECONDS", "InUse"]

log = logging.getLogger("moorage.cache")

#: Manifests whose references are remembered, and how long a served manifest keeps its blobs
#: ahead in the eviction order (they are what its client asks for next).
MAX_REFERENCED_MANIFESTS: Final = 4096
REFERENCED_SECONDS: Final = 300.0


class InUse:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        #: Manifests served for reading lately, and when.
        self._served: dict[Digest, float] = {}
        #: Content stored in the last seconds, and when.
        self._stored_lately: dict[Digest, float] = {}
        #: What each manifest names (child manifests, config, layers), least recently served first.
        self._references: OrderedDict[Digest, tuple[Digest, ...]] = OrderedDict()

    def served_for_reading(self, digest: Digest, body: bytes, now: float) -> None:
        """A manifest was served to a client that reads it: what it names comes next."""
        self._served[digest] = now
        if digest in self._references:
            self._references.move_to_end(digest)
            return
        try:
            children, config, layers = parts(body)
        except Exception:  # bookkeeping: an odd manifest must never fail its pull
            log.exception("references not read", extra={"event": "internal_error", "digest": str(digest)})
            return
        self._references[digest] = (*children, *config, *layers)
        while len(self._references) > MAX_REFERENCED_MANIFESTS:
            self._references.popitem(last=False)

    def stored(self, digest: Digest) -> None:
        """Content was stored just now: its client has just read it."""
        self._stored_lately[digest] = self._clock()

    def recent_stores(self) -> set[Digest]:
        """What was stored in the last ``RECENT_SECONDS`` (and forget the rest)."""
        now = self._clock()
        self._stored_lately = {
            digest: when for digest, when in self._stored_lately.items() if within(when, now, RECENT_SECONDS)
        }
        return set(self._stored_lately)

    def served(self) -> set[Digest]:
        """The manifests served for reading in the last ``REFERENCED_SECONDS``."""
        return set(self._served)

    def images(self) -> set[Digest]:
        """Manifests served for reading in the last ``REFERENCED_SECONDS`` and what they name:
        the images being pulled, however long their pulls take."""
        used = set(self._served)
        for manifest in self._served:
            used.update(self._references.get(manifest, ()))
        return used

    def order(self, accessed: Mapping[Digest, float]) -> dict[Digest, float]:
        """When each digest was last read (``accessed``), or named by a manifest served for
        reading."""
        seen = dict(accessed)
        for manifest, when in self._served.items():
            for digest in self._references.get(manifest, ()):
                if seen.get(digest, 0.0) < when:
                    seen[digest] = when
        return seen

    def prune(self, now: float) -> None:
        """Forget what is no longer recent: the maps stay small between passes."""
        self.recent_stores()
        self._served = {digest: when for digest, when in self._served.items() if within(when, now, REFERENCED_SECONDS)}
