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
manifest's order. A client asking for one of them joins the fill in flight (single flight), so
each blob is still fetched once.

The client's own download of the layer that fired the prefetch goes first while it runs at
``FAST_FILL_RATE`` or more, looked at every ``CLIENT_LOOK_SECONDS``: then the cores set its
pace (a near upstream, or a far one on a fast link), and a prefetch beside it would only share
them. Found slower at a look, it lets the prefetch start beside it. Its body in, it counts
toward ``FAR_DOWNLOADS`` like the prefetch's own downloads.

How many at once: one, and up to ``at_once`` per image from the moment the image's downloads
ran slow: one has run for ``RAMP_SECONDS`` at less than ``FAST_FILL_RATE`` while still
receiving its body, or ``FAR_DOWNLOADS`` have each taken ``FAR_LATENCY`` longer than their
bytes need at that rate (a far registry, where each request waits round trips, however small
its blob). Several downloads at once help where each connection is slow or far (a registry
across the internet); where one connection already brings 100 MB/s within a few
milliseconds, the cache's event loop and the client's own work (digests, disk) are what a
pull waits for, and more downloads would only share them (measured: a cold pull with the
client and the cache on the same two cores took a tenth longer with three at once than with
none). A download counts until its body is in; its digest check and fsync go on without it.

Never armed for an index (its platforms' manifests are fetched by digest when a client picks
one, and arm their own), nor for a manifest answered from the store. Foreign layers (with
``urls``) are skipped. A failed prefetch is logged by its fill and nothing else: the client's
own request starts the fill again and gets the upstream's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from moorage.upstreams.reference import Digest, RepositoryName

from ._fill import FillReader, Fills
from ._gc import parts
from ._source import BlobSource
from .errors import error_text

__all__ = [
    "CLIENT_LOOK_SECONDS",
    "FAR_DOWNLOADS",
    "FAR_LATENCY",
    "FAST_FILL_RATE",
    "MAX_ARMED_LAYERS",
    "MAX_ARMED_MANIFEST",
    "RAMP_SECONDS",
    "Prefetcher",
    "prefetchable",
]

log = logging.getLogger("moorage.cache")

#: Layers of armed prefetches remembered; the oldest are forgotten first.
MAX_ARMED_LAYERS = 16_384
#: A larger manifest is not armed: it is parsed on the event loop. An image manifest this size
#: would name about a thousand layers; Docker's limit is 127.
MAX_ARMED_MANIFEST = 256 * 1024
#: Bytes per second of one prefetch below which an image's prefetches run ``at_once`` at a time.
FAST_FILL_RATE = 100_000_000
#: How long a prefetch runs before its rate counts.
RAMP_SECONDS = 0.25
#: How often a client's own download of the layer that fired a prefetch is looked at while the
#: prefetch waits for it (``_while_fast``).
CLIENT_LOOK_SECONDS = 0.05
#: Seconds a download took to the end of its body beyond what its bytes need at
#: ``FAST_FILL_RATE`` that tell a far upstream (each request waits round trips) ...
FAR_LATENCY = 0.03
#: ... once this many of an image's downloads did: then its prefetches run ``at_once`` at a
#: time. (One is not enough: a fresh process's first download locally can take that long.)
FAR_DOWNLOADS = 2


def prefetchable(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """(config, layers) of an image manifest that its registry serves, in the manifest's
    order; nothing for an index or for a body that is not a manifest."""
    children, config, layers = parts(body, distributable=True)
    return ([], []) if children else (config, layers)


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
        stored: Callable[[Digest], bool],
        on_start: Callable[[str, Digest], None],
        on_failed: Callable[[Digest], None],
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self._fills = fills
        #: Whether the store holds a digest; blocks (run in a thread).
        self._stored = stored
        #: Told of each fill a prefetch started (upstream host, digest; not of those it found
        #: running) ...
        self._on_start = on_start
        #: ... and of each of those that stored nothing.
        self._on_failed = on_failed
        #: (upstream host, repository, layer) -> the plan that layer's first request fires;
        #: None for a layer that two armed images share, which fires neither.
        self._armed: OrderedDict[tuple[str, str, Digest], _Plan | None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: Prefetch downloads at once from each upstream, across images (absent: unlimited).
        self._limits = dict(limits or {})
        self._upstream_slots: dict[str, asyncio.Semaphore] = {}

    def __len__(self) -> int:
        """Prefetches running now."""
        return len(self._tasks)

    @property
    def armed(self) -> int:
        """Layers whose first request would fire a prefetch."""
        return sum(1 for plan in self._armed.values() if plan is not None)

    def arm(self, source: BlobSource, repository: RepositoryName, manifest: bytes, at_once: int) -> None:
        """Prefetch the blobs ``manifest`` refers to, up to ``at_once`` at a time, once a client
        asks for one of its layers through this route (``at_once`` 0: never)."""
        if at_once <= 0 or len(manifest) > MAX_ARMED_MANIFEST or self._closed:
            return
        config, layers = prefetchable(manifest)
        if not layers:
            return
        plan = _Plan(source, repository, list(dict.fromkeys([*config, *layers])), at_once)
        for layer in layers:
            key = (source.host, str(repository), layer)
            armed = self._armed.get(key, plan)
            # A layer two images share (a base layer) tells neither apart: a pull of one must
            # not fetch the other, so such a layer fires nothing; each image's own layers do.
            self._armed[key] = plan if armed is plan or (armed is not None and armed.blobs == plan.blobs) else None
            self._armed.move_to_end(key)
        while len(self._armed) > MAX_ARMED_LAYERS:
            self._armed.popitem(last=False)

    def fire(self, host: str, repository: RepositoryName, digest: Digest) -> None:
        """A client asked for blob ``digest`` through this route: start the prefetch it arms."""
        if not self._armed:
            return
        plan = self._armed.get((host, str(repository), digest))
        if plan is None:
            return
        for blob in plan.blobs:  # disarm the plan's layers
            key = (host, str(repository), blob)
            if self._armed.get(key) is plan:
                del self._armed[key]
        wanted = [blob for blob in plan.blobs if blob != digest]  # the client fetches that one
        task = asyncio.get_running_loop().create_task(self._run(plan, wanted, digest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slots_of(self, host: str) -> contextlib.AbstractAsyncContextManager[object]:
        """The upstream's prefetch slots, shared by all its images' prefetches."""
        limit = self._limits.get(host)
        if limit is None:
            return contextlib.nullcontext()
        if host not in self._upstream_slots:
            self._upstream_slots[host] = asyncio.Semaphore(limit)
        return self._upstream_slots[host]

    async def _after_the_client(self, digest: Digest) -> bool:
        """Wait for the client's own download of ``digest`` (the layer that fired the prefetch)
        while it runs fast (``_while_fast``); whether it waited on the upstream (``_waited_long``)."""
        client = self._fills.join(digest)
        if client is None:  # stored, or already in
            return False
        client.close()  # only looked at, not followed
        await _while_fast(client)
        return _waited_long(client)

    async def _run(self, plan: _Plan, digests: list[Digest], fired_by: Digest) -> None:
        upstream_slots = self._slots_of(plan.source.host)
        #: The image's prefetch downloads still receiving their body: when each started, and its
        #: fill (each leaves once its body is in).
        downloading: dict[Digest, tuple[float, FillReader]] = {}
        #: The image's downloads whose body is in that waited on the upstream (``_waited_long``),
        #: the client's own among them.
        far = 1 if await self._after_the_client(fired_by) else 0
        errors: list[Exception] = []

        async def one(digest: Digest) -> FillReader | None:
            """Download ``digest`` unless it is stored or being fetched; its fill once the body
            is in (verifying and storing it need no slot), None when none was started."""
            nonlocal far
            try:
                async with upstream_slots:
                    # Looked at when its turn came: a client may have stored it meanwhile.
                    looked = time.monotonic()
                    if await asyncio.to_thread(self._stored, digest):
                        return None
                    if self._fills.recently_committed(digest, since=looked) is not None:
                        return None
                    clients = self._fills.join(digest)
                    if clients is not None:  # a client's fetch: it needs no slot of ours
                        clients.keep()  # and goes on should that client leave
                        clients.close()
                        return None
                    reader = self._fills.start(plan.source, plan.repository, digest, kept=True)
                    reader.close()  # the fill goes on; a prefetch is not a client following it
                    self._on_start(plan.source.host, digest)
                    downloading[digest] = (time.monotonic(), reader)
                    try:
                        await reader.body_received()
                    finally:
                        del downloading[digest]
                    if _waited_long(reader):
                        far += 1
                    return reader
            except Exception as exc:  # a store that cannot be read, say
                errors.append(exc)
                return None

        async def stored(reader: FillReader) -> None:
            if not await reader.finished():
                self._on_failed(reader.digest)

        waiting = deque(digests)
        wide = False  # once the image's downloads ran slow, the rest go at_once at a time
        async with asyncio.TaskGroup() as group:
            running: set[asyncio.Task[FillReader | None]] = set()
            while waiting or running:
                wide = wide or far >= FAR_DOWNLOADS or _any_slow(downloading.values())
                while waiting and len(running) < (plan.at_once if wide else 1):
                    running.add(group.create_task(one(waiting.popleft())))
                judge_in = None if wide else _until_judged(downloading.values())
                done, pending = await asyncio.wait(running, timeout=judge_in, return_when=asyncio.FIRST_COMPLETED)
                running = set(pending)
                for task in done:
                    if (reader := task.result()) is not None:
                        group.create_task(stored(reader))
        if errors:  # the clients' own requests will tell them
            log.warning(
                "prefetch failed",
                extra={
                    "event": "prefetch_failed",
                    "upstream": plan.source.host,
                    "repository": str(plan.repository),
                    "failed": len(errors),
                    "error": error_text(errors[0]),
                },
            )

    async def aclose(self) -> None:
        self._closed = True
        self._armed.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _any_slow(downloading: Iterable[tuple[float, FillReader]]) -> bool:
    """Whether a download still receiving its body (the only ones ``downloading`` holds) has
    run for ``RAMP_SECONDS`` at less than ``FAST_FILL_RATE``: then the connection, not the
    cache, sets the pace, and more at once will help."""
    now = time.monotonic()
    return any(
        now - started >= RAMP_SECONDS and reader.received < FAST_FILL_RATE * (now - started)
        for started, reader in downloading
    )


async def _while_fast(client: FillReader) -> None:
    """Wait until a client's download has its body in, while each look at it (every
    ``CLIENT_LOOK_SECONDS``) finds it received ``FAST_FILL_RATE`` or more since the last one:
    then the cores, not the connection, set its pace, and a prefetch beside it would only
    share them. Found slower (a far or slow upstream, or a stall), the wait ends at that look."""
    while True:
        looked, received = time.monotonic(), client.received
        try:
            async with asyncio.timeout(CLIENT_LOOK_SECONDS):
                await client.body_received()
            return
        except TimeoutError:
            if client.received - received < FAST_FILL_RATE * (time.monotonic() - looked):
                return


def _waited_long(reader: FillReader) -> bool:
    """Whether a download whose body is in took ``FAR_LATENCY`` longer than its bytes need at
    ``FAST_FILL_RATE``: time spent waiting on the upstream (round trips, redirects, or the
    upstream's download slots, all taken), not on the cache's CPU."""
    seconds = reader.body_seconds
    return seconds is not None and seconds - reader.received / FAST_FILL_RATE >= FAR_LATENCY


def _until_judged(downloading: Iterable[tuple[float, FillReader]]) -> float:
    """Seconds until the next download still receiving its body has run ``RAMP_SECONDS`` and
    can be judged (``_any_slow``); ``RAMP_SECONDS`` when none is that young (or none runs)."""
    now = time.monotonic()
    young = [RAMP_SECONDS - (now - started) for started, _ in downloading if now - started < RAMP_SECONDS]
    return max(0.01, min(young)) if young else RAMP_SECONDS
