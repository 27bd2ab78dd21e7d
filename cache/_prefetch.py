"""Prefetch: the rest of an image fetched ahead of the client that started pulling it.

A client pulling an image asks for the manifest, then for its config and layers, some clients
one at a time (skopeo, and podman into some destinations), others a few at a time (Docker and
containerd, three by default). Across the internet each download is bound by its own
connection, so a cache that waits for each request is as slow as a direct pull.

When an image manifest comes from the upstream (a miss, or a tag whose digest changed), the
cache *arms* a prefetch for it: nothing is fetched yet, because many clients read manifests
and never pull (``skopeo inspect``, ``docker manifest inspect``, dependency bots). The first
time a client asks for one of its layers through the same route, the prefetch *fires*: fills
start for the other blobs the manifest refers to and the store does not hold, in the
manifest's order, ``at_once`` at a time per image. A client asking for one of them joins the
fill in flight (single flight), so each blob is still fetched once.

Never armed for an index (its platforms' manifests are fetched by digest when a client picks
one, and arm their own), nor for a manifest answered from the store. Foreign layers (with
``urls``) are skipped. A failed prefetch is logged by its fill and nothing else: the client's
own request starts the fill again and gets the upstream's answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moorage.upstreams.reference import Digest, RepositoryName

from ._fill import Fills
from ._gc import references
from ._source import BlobSource

__all__ = ["MAX_ARMED_LAYERS", "Prefetcher", "prefetchable"]

#: Layers of armed prefetches remembered; the oldest are forgotten first.
MAX_ARMED_LAYERS = 16_384


def prefetchable(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """(config, layers) of an image manifest that its registry serves, in the manifest's
    order; nothing for an index or for a body that is not a manifest."""
    children, blobs = references(body, distributable=True)
    if children or not blobs:
        return [], []
    return blobs[:1], blobs[1:]


@dataclass(eq=False)
class _Plan:
    source: BlobSource
    repository: RepositoryName
    blobs: list[Digest]
    at_once: int


class Prefetcher:
    """Armed prefetches, keyed by the layers that fire them, and the tasks of fired ones
    (one per image); the tasks end with the cache (``aclose``)."""

    def __init__(
        self,
        fills: Fills,
        stored: Callable[[Sequence[Digest]], set[Digest]],
        on_start: Callable[[Digest], None],
    ) -> None:
        self._fills = fills
        #: Which of these digests the store holds; blocks (run in a thread).
        self._stored = stored
        #: Told of each fill a prefetch started (not of those it joined).
        self._on_start = on_start
        #: (upstream host, repository, layer) -> the plan that layer's first request fires.
        self._armed: OrderedDict[tuple[str, str, Digest], _Plan] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Prefetches running now."""
        return len(self._tasks)

    @property
    def armed(self) -> int:
        """Layers whose first request would fire a prefetch."""
        return len(self._armed)

    def arm(self, source: BlobSource, repository: RepositoryName, manifest: bytes, at_once: int) -> None:
        """Prefetch the blobs ``manifest`` refers to, ``at_once`` at a time, once a client asks
        for one of its layers through this route (``at_once`` 0: never)."""
        config, layers = prefetchable(manifest)
        if at_once <= 0 or not layers:
            return
        plan = _Plan(source, repository, list(dict.fromkeys([*config, *layers])), at_once)
        for layer in layers:
            key = (source.host, str(repository), layer)
            self._armed[key] = plan  # a layer shared with an image armed earlier: the latest wins
            self._armed.move_to_end(key)
        while len(self._armed) > MAX_ARMED_LAYERS:
            self._armed.popitem(last=False)

    def fire(self, host: str, repository: RepositoryName, digest: Digest) -> None:
        """A client asked for blob ``digest`` through this route: start the prefetch it arms."""
        if not self._armed:
            return
        plan = self._armed.pop((host, str(repository), digest), None)
        if plan is None:
            return
        for blob in plan.blobs:  # disarm the plan's other layers
            key = (host, str(repository), blob)
            if self._armed.get(key) is plan:
                del self._armed[key]
        wanted = [blob for blob in plan.blobs if blob != digest]  # the client fetches that one
        task = asyncio.get_running_loop().create_task(self._run(plan, wanted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, plan: _Plan, digests: list[Digest]) -> None:
        looked = time.monotonic()
        held = await asyncio.to_thread(self._stored, digests)
        slots = asyncio.Semaphore(plan.at_once)

        async def one(digest: Digest) -> None:
            async with slots:
                if self._fills.recently_committed(digest, since=looked) is not None:
                    return  # a client's fill stored it meanwhile
                reader = self._fills.join(digest)
                if reader is None:
                    reader = self._fills.start(plan.source, plan.repository, digest)
                    self._on_start(digest)
                try:
                    await reader.finished()
                finally:
                    reader.close()

        await asyncio.gather(*(one(digest) for digest in digests if digest not in held))

    async def aclose(self) -> None:
        self._armed.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
