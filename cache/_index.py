"""The embedded index: tag answers, manifest media types, tag and referrers lists, in diskcache (SQLite).

Every method blocks and is called from a thread by the cache; keys come only from ``_keys``.
Entries leave this module as frozen values.
"""

from __future__ import annotations

import errno
import itertools
import pickle
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeGuard, get_args

import diskcache

from moorage.upstreams.reference import AcceptClass, Digest, InvalidReference, page_query, parse_digest

from ._keys import (
    COUNT_OWED_KEY,
    FORMAT_KEY,
    SERVING_KEY,
    STORE_FORMAT,
    STORE_TOTALS_KEY,
    USAGE_KEY,
    IndexKey,
    blob_key,
    image_key,
    manifest_key,
    pass_key,
    pulled_key,
    referrers_key,
    routes_key,
)
from ._layout import index_dir, index_files
from ._routes import ContentRoute, bounded
from ._store import Fingerprint
from .errors import IndexFailure, StoreFailure, error_text

__all__ = ["Index", "ReferrersEntry", "TagEntry", "TagsEntry", "Usage", "index_problem", "is_disk_full", "tag_entry"]

#: Counters per upstream, by name: cache results (hit, miss, …) and byte totals.
Usage = dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    media_type: str
    #: When the upstream last confirmed this digest (GET or HEAD), epoch seconds.
    checked_at: float


@dataclass(frozen=True, slots=True)
class TagsEntry:
    body: bytes
    #: The query of the next page (canonical, as ``reference.page_query`` makes it), if any.
    next_query: str | None
    fetched_at: float


@dataclass(frozen=True, slots=True)
class ReferrersEntry:
    #: An OCI image index; None when the upstream has no referrers API (``NoReferrersApi``).
    body: bytes | None
    next_query: str | None
    fetched_at: float


def is_disk_full(error: BaseException) -> bool:
    """Whether an index or store write failed for want of space (SQLite's error, the OS's, or
    the cache's :class:`StoreFailure` made of either)."""
    if isinstance(error, StoreFailure):
        return error.disk_full
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


@contextmanager
def _recording(what: str) -> Iterator[None]:
    """An index write that fails (SQLite's disk is full, another process holds the write lock
    too long) as the cache's :class:`StoreFailure`: what was fetched and verified is still
    served, stale answers still stand in for the upstream, and a full disk starts eviction."""
    try:
        yield
    except OSError as exc:  # diskcache keeps values from 32 KiB up (tag list pages) in files
        failure = StoreFailure.of(f"the index cannot record {what}", exc)
        raise IndexFailure(str(failure), disk_full=failure.disk_full) from exc
    except (sqlite3.Error, diskcache.Timeout) as exc:
        raise IndexFailure(f"the index cannot record {what}: {error_text(exc)}", disk_full=is_disk_full(exc)) from exc


def _unopened(directory: Path, error: sqlite3.Error | diskcache.Timeout) -> str:
    """Why the index in ``directory`` cannot be opened, and what to do about it."""
    reason = str(error) or type(error).__name__
    if is_disk_full(error):
        return f"the index {directory} cannot be opened: {reason}; free space on its volume"
    if isinstance(error, sqlite3.OperationalError):  # no permission, a read-only mount, a lock
        return f"the index {directory} cannot be opened: {reason}; the daemon's user must be able to write it"
    return (
        f"the index {directory} cannot be opened: {reason}; move it aside to start with an empty one "
        "(tags and manifests are then fetched again, and stored blobs no image names are collected as garbage)"
    )


def index_problem(root: Path) -> str | None:
    """Why this version could not serve the store at ``root`` for its index (written by a later
    version, or damaged), or None; a store with no index yet has none. Reads the index
    read-only, writing nothing: opening it as serving does writes diskcache's settings, into a
    later version's store and a daemon's live index alike. Blocks."""
    database = index_files(root)[1]
    if not database.exists():
        return None
    try:
        written = _read_only(database, FORMAT_KEY)
    except sqlite3.Error as exc:
        return _unopened(index_dir(root), exc)
    except Exception as exc:  # a value diskcache cannot read back: damaged
        return _unopened(index_dir(root), sqlite3.DatabaseError(f"{type(exc).__name__}: {exc}"))
    return _later(root, written)


def _read_only(database: Path, key: IndexKey) -> object:
    """``key``'s value in diskcache's ``database``, opened read-only, as diskcache reads it;
    None in a database diskcache has not set up yet (serving sets it up)."""
    connection = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "Cache" not in tables:  # an index begun and never set up (a first start killed at once)
            return None
        protocol = None
        if "Settings" in tables:
            protocol = connection.execute("SELECT value FROM Settings WHERE key = 'disk_pickle_protocol'").fetchone()
        disk = diskcache.Disk(
            str(database.parent), pickle_protocol=protocol[0] if protocol else pickle.HIGHEST_PROTOCOL
        )
        stored_key, raw = disk.put(key)
        row = connection.execute("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = ?", (stored_key, raw))
        found = row.fetchone()
        return None if found is None else disk.fetch(*found, False)
    finally:
        connection.close()


def _later(root: Path, written: object) -> str | None:
    """Why a store whose index says it is of format ``written`` is not this version's to serve."""
    if written is None or (isinstance(written, int) and written <= STORE_FORMAT):
        return None
    return (
        f"the store at {root} was written by a later Moorage (store format {written}; "
        f"this version reads up to {STORE_FORMAT}): run that version or a later one on it, or give "
        "this one another storage.path"
    )


_TEXT: Final = (str, type(None))
_TIME: Final = (int, float)


def _shaped(value: object, *shape: type | tuple[type, ...]) -> TypeGuard[tuple[Any, ...]]:
    """Whether an index value is a tuple of the types ``shape`` names, place by place: what
    this version reads. Another layout (a later version's, after a rollback) or a damaged entry
    had raised on every read of it, and failed every pull it answers for good."""
    return (
        isinstance(value, tuple)
        and len(value) == len(shape)
        and all(isinstance(item, kind) for item, kind in zip(value, shape, strict=True))
    )


def tag_entry(value: object) -> TagEntry | None:
    """A tag answer as the index holds it; None for a value this version cannot read."""
    if not _shaped(value, str, str, _TIME):
        return None
    digest, media_type, checked_at = value
    try:
        return TagEntry(parse_digest(digest), media_type, checked_at)
    except InvalidReference:
        return None


#: Keys deleted per write transaction. An eviction pass removing 393,000 blobs held the
#: index's write lock for 36 s in one, and every pull recording a tag waited for it; the
#: threads they waited on were the ones cached pulls and readiness checks needed as well.
DELETE_BATCH: Final = 1_000


def _batches(keys: Iterable[IndexKey]) -> Iterator[list[IndexKey]]:
    remaining = iter(keys)
    while batch := list(itertools.islice(remaining, DELETE_BATCH)):
        yield batch


def _points_at(value: object, digests: set[str]) -> bool:
    """Whether a tag answer's value names one of ``digests``."""
    return isinstance(value, tuple) and bool(value) and value[0] in digests


class Index:
    def __init__(self, directory: Path) -> None:
        # No size limit and no culling: eviction is decided by the cache, not by diskcache.
        # Each commit is on disk before it returns (SQLite's synchronous=FULL; diskcache's
        # NORMAL syncs the write-ahead log only at checkpoints, so a power loss could take every
        # tag recorded since, and refetching them costs the upstream's pull limits): 0.4 ms a
        # write here against 0.1, on a thread, where a cold manifest writes three.
        try:
            self._db = diskcache.Cache(
                str(directory), size_limit=2**62, cull_limit=0, eviction_policy="none", sqlite_synchronous=2
            )
            written = self._db.get(FORMAT_KEY)
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise IndexFailure(_unopened(directory, exc), disk_full=is_disk_full(exc)) from exc
        later = _later(directory.parent, written)
        if later is not None:
            # Its values may not read as this version expects, and its gc and eviction would
            # act on what they misread: refused before anything is read or changed (serve and
            # check-config find it first without opening the index: index_problem).
            self._db.close()
            raise IndexFailure(later)

    def _read(self, key: IndexKey) -> Any:
        """``key``'s value, or None. An index that cannot be read (its files removed under a
        running daemon, or damaged) is :class:`IndexFailure`, which a request answers with 503."""
        try:
            return self._db.get(key)
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise IndexFailure(f"the index cannot be read: {error_text(exc)}") from exc

    def close(self) -> None:
        self._db.close()

    def check(self) -> str | None:
        """None when the index answers a read, else what went wrong."""
        try:
            self._db.get(("check",))
        except Exception as exc:  # diskcache raises sqlite3 errors of many kinds
            return f"index unreadable: {exc}"
        return None

    def tag(self, key: IndexKey) -> TagEntry | None:
        """None also for a value this version cannot read: the tag is fetched again, and the
        entry written anew, where it had failed every pull of the tag for good."""
        return tag_entry(self._read(key))

    def put_tag(self, key: IndexKey, entry: TagEntry) -> None:
        with _recording("a tag"):
            self._db.set(key, (str(entry.digest), entry.media_type, entry.checked_at))

    def has_manifest(self, digest: Digest) -> bool:
        return self._read(manifest_key(digest)) is not None

    def manifest_media_type(self, digest: Digest) -> str | None:
        value = self._read(manifest_key(digest))
        return value if isinstance(value, str) else None

    def put_manifest(self, digest: Digest, media_type: str) -> None:
        with _recording("a manifest"):
            self._db.set(manifest_key(digest), media_type)

    def fingerprint(self, digest: Digest) -> Fingerprint | None:
        value = self._read(blob_key(digest))
        return Fingerprint(*value) if isinstance(value, tuple) and len(value) == 3 else None

    def routes(self, digest: Digest) -> tuple[ContentRoute, ...]:
        """The routes ``digest`` was fetched or confirmed under, oldest first."""
        value = self._read(routes_key(digest))
        if not isinstance(value, tuple):
            return ()
        return tuple((str(upstream), str(repository)) for upstream, repository in value)

    def _add_routes(self, digest: Digest, routes: list[ContentRoute]) -> None:
        """Add routes of ``digest`` (the most recent ``MAX_ROUTES_PER_DIGEST`` are kept); call
        inside a transaction."""
        current = self.routes(digest)
        merged = bounded((*current, *routes))
        if merged != current:
            self._db.set(routes_key(digest), merged)
            for upstream, repository in set(current) - set(merged):  # fell out of the bound
                self._db.delete(referrers_key(upstream, repository, digest, ""))

    def tags(self, key: IndexKey) -> TagsEntry | None:
        value = self._read(key)
        if _shaped(value, bytes, _TEXT, _TEXT, _TIME):  # before next pages were queries: (…, last, n, …)
            body, next_last, next_n, fetched_at = value
            following = [("last", next_last), *([("n", next_n)] if next_n else [])] if next_last else []
            return TagsEntry(body, page_query(following) or None, fetched_at)
        if not _shaped(value, bytes, _TEXT, _TIME):
            return None
        body, next_query, fetched_at = value
        return TagsEntry(body, next_query, fetched_at)

    def put_tags(self, key: IndexKey, entry: TagsEntry) -> None:
        with _recording("a tag list"):
            self._db.set(key, (entry.body, entry.next_query, entry.fetched_at))

    def referrers(self, key: IndexKey) -> ReferrersEntry | None:
        value = self._read(key)
        if not _shaped(value, (bytes, type(None)), _TEXT, _TIME):
            return None
        body, next_query, fetched_at = value
        return ReferrersEntry(body, next_query, fetched_at)

    def discard(self, key: IndexKey) -> None:
        """Delete ``key`` where it is held (only a read where it is not)."""
        with _recording("a removal"):
            if key in self._db:
                self._db.delete(key)

    def put_referrers(self, key: IndexKey, entry: ReferrersEntry, subject: Digest, route: ContentRoute) -> bool:
        """Keep a referrers list where its ``subject`` manifest is stored, with the ``route``
        it is known under (``forget`` drops the list with the manifest, a lifecycle expiry
        with the image, and a route that falls out of the bounded routes with the route);
        whether it is kept."""
        with _recording("a referrers list"), self._db.transact():
            if self._db.get(manifest_key(subject)) is None:
                return False
            self._add_routes(subject, [route])
            self._db.set(key, (entry.body, entry.next_query, entry.fetched_at))
            return True

    # -- bookkeeping, written in batches by the cache ------------------------------------------

    def usage(self) -> Usage:
        value = self._db.get(USAGE_KEY)
        return value if isinstance(value, dict) else {}

    def store_totals(self) -> tuple[int, int] | None:
        """(bytes, entries) in the blob store, as the processes sharing it added them up;
        None for a store from before totals were kept. Briefly below zero at times (see
        ``write_batch``)."""
        value = self._db.get(STORE_TOTALS_KEY)
        return (int(value[0]), int(value[1])) if isinstance(value, tuple) else None

    def begin_serving(self, now: float, *, alone: bool = True) -> bool:
        """Mark the store as served by a daemon, in this version's format; True when the mark
        was already there: the last daemon did not stop cleanly, and what it had not flushed (up
        to its last seconds of store totals) is lost. True too for totals written before the
        format was: the earliest of their daemons kept no such mark, so a crash there left them
        short for good (a store of the later ones, which kept it, is counted once more than it
        needed).

        Only a daemon that starts ``alone`` counts. One that starts beside a running process
        (``moorage warm --store``, a rolling upgrade of a shared store) records the format all
        the same, for every version that reads the store, and leaves a count owed to the next
        start alone: the mark is one for all of them, so when one of them dies and another
        then stops cleanly, the mark is gone with what the dead one had not flushed. Without
        the count owed, a store whose totals fell short so stayed short for good, and above its
        cap (150 % of it, measured by an independent review)."""
        with _recording("the serving mark"), self._db.transact():
            unmarked = self._db.get(FORMAT_KEY) is None and self._db.get(STORE_TOTALS_KEY) is not None
            owed = self._db.get(COUNT_OWED_KEY) is not None
            crashed = self._db.get(SERVING_KEY) is not None or unmarked or owed
            self._db.set(SERVING_KEY, now)
            self._db.set(FORMAT_KEY, STORE_FORMAT)
            if alone:
                self._db.delete(COUNT_OWED_KEY)  # counted now; a count cut short leaves the serving mark
            else:
                self._db.set(COUNT_OWED_KEY, now)
        return crashed

    def last_pass(self, task: str, now: float) -> float:
        """When the scheduled pass ``task`` last ran; the first time asked, ``now``, recorded
        as if it had (a store's first pass is due an interval after its first start)."""
        with _recording("a scheduled pass"):
            self._db.add(pass_key(task), now)
        value = self._read(pass_key(task))
        return float(value) if isinstance(value, int | float) else now

    def record_pass(self, task: str, at: float) -> None:
        with _recording("a scheduled pass"):
            self._db.set(pass_key(task), at)

    def mark_format(self) -> None:
        """Record this version's format: for a store just counted, whose totals are true."""
        with _recording("the store's format"):
            self._db.set(FORMAT_KEY, STORE_FORMAT)

    def end_serving(self) -> None:
        """A clean stop: everything is flushed."""
        self._db.delete(SERVING_KEY)

    def write_batch(
        self,
        usage_deltas: Usage,
        pulled: Mapping[IndexKey, float],
        store_change: tuple[int, int] = (0, 0),
        fingerprints: Mapping[Digest, Fingerprint] | None = None,
        routes: Mapping[Digest, list[ContentRoute]] | None = None,
        *,
        counted_totals: tuple[int, int] | None = None,
        manifests: Mapping[Digest, str] | None = None,
    ) -> tuple[int, int]:
        """One transaction: add usage deltas, record pull times, the fingerprints of files
        known good, the routes content was learnt under and the ``manifests`` (by media type)
        pulled that the index no longer recorded, and add ``store_change`` (bytes, entries) to
        the store totals, or set them to ``counted_totals`` where a walk of the store just
        counted them. Returns the store totals now held.

        The totals are changed, not overwritten, so that what several processes store and
        remove adds up: a daemon's batches, and ``moorage gc`` and ``moorage verify --repair``
        run beside it."""
        with _recording("the store's bookkeeping"), self._db.transact():
            for digest, learnt in (routes or {}).items():
                self._add_routes(digest, learnt)
            for digest, fingerprint in (fingerprints or {}).items():
                self._db.set(blob_key(digest), tuple(fingerprint))
            if usage_deltas:
                usage = self.usage()
                for upstream, deltas in usage_deltas.items():
                    counters = usage.setdefault(upstream, {})
                    for name, delta in deltas.items():
                        counters[name] = counters.get(name, 0) + delta
                self._db.set(USAGE_KEY, usage)
            for key, when in pulled.items():
                self._db.set(key, when)
                if key[0] == "image-pulled":  # an image first seen in this repository by a hit
                    self._db.add(image_key(*key[1:]), when)
            for digest, media_type in (manifests or {}).items():  # pulled, and no longer recorded
                self._db.add(manifest_key(digest), media_type)
            if counted_totals is not None:
                totals = counted_totals
            else:
                # No floor at zero: a command may remove what a daemon stored and has not
                # added yet, so the sum may be below zero until the daemon's batch comes.
                held = self.store_totals() or (0, 0)
                totals = (held[0] + store_change[0], held[1] + store_change[1])
            self._db.set(STORE_TOTALS_KEY, totals)
            return totals

    def _walk(self) -> Iterator[Any]:
        """Every key, in the order each was first written (a rewrite keeps its place): one pass
        over the table. (diskcache's ``iterkeys``
        asks again from the top for each hundred keys in key order, which grows with the square
        of the index: 4 s for 80,000 keys, most of an hour for a store of a million blobs.)
        Keys written after the walk began are not in it."""
        return iter(self._db)

    def tag_entries(self) -> Iterator[tuple[IndexKey, TagEntry]]:
        """Every tag answer held, with its key (upstream, repository, tag, accept class)."""
        for key in self._walk():
            if isinstance(key, tuple) and key and key[0] == "tag":
                entry = self.tag(key)
                if entry is not None:
                    yield key, entry

    def add_image(self, key: IndexKey, when: float, *, anew: bool = False) -> None:
        """Record when a manifest was first cached for a repository (kept if already known,
        unless it was stored ``anew``: a time left from before its file left the store made a
        manifest cached again look old, and a rule expired it at once)."""
        with _recording("an image"):
            if anew:
                self._db.set(key, when)
            else:
                self._db.add(key, when)

    def entries(self, kinds: frozenset[str]) -> Iterator[tuple[IndexKey, object]]:
        """Every entry whose key is of one of ``kinds`` (``tag``, ``image``, …); one walk of
        the whole index. Entries deleted meanwhile are passed over."""
        for key in self._walk():
            if isinstance(key, tuple) and key and key[0] in kinds:
                value = self._db.get(key)
                if value is not None:
                    yield key, value

    def delete(self, keys: Iterable[IndexKey]) -> None:
        """Delete ``keys``, ``DELETE_BATCH`` of them per write transaction."""
        for batch in _batches(keys):
            with self._db.transact():
                for key in batch:
                    self._db.delete(key)

    def pulled_at(self, key: IndexKey) -> float | None:
        value = self._read(key)
        return float(value) if isinstance(value, int | float) else None

    def forget(self, digests: set[Digest]) -> int:
        """Drop what the index says of blobs that left the store: their fingerprints, manifest
        entries, every tag answer pointing at one of them and the referrers lists of each; the
        number of tag answers dropped. No write transaction is longer than a batch's."""
        self.delete(key for digest in digests for key in (blob_key(digest), routes_key(digest)))
        manifests = {str(d): d for d in digests if self._db.get(manifest_key(d)) is not None}
        if not manifests:  # only layers went: no tag can point at them
            return 0
        self.delete(manifest_key(digest) for digest in manifests.values())
        # The walk holds no write lock (it takes as long as the index is large, and every tag
        # and manifest recorded would wait for it); what it found is deleted in batches, each
        # key looked at again in its batch's transaction: a tag only where it still points at a
        # digest that went, and nothing of a manifest pulled again meanwhile (its tags, image
        # and referrers were just written).
        names = set(manifests)
        tags: list[IndexKey] = []
        others: list[IndexKey] = []
        for key in self._walk():
            if not isinstance(key, tuple) or not key:
                continue
            if key[0] == "tag":
                tags.append(key)
            elif key[0] in ("image", "image-pulled") and len(key) == 4 and key[3] in names:
                others.append(key)  # the image left the cache with its manifest
            elif key[0] == "referrers" and len(key) == 5 and key[3] in names:
                others.append(key)  # a list of referrers leaves with their subject
        gone = [key for key in tags if _points_at(self._db.get(key), names)]

        def still_gone(name: object) -> bool:
            return name in manifests and self._db.get(manifest_key(manifests[str(name)])) is None

        dropped = 0
        untagged: set[IndexKey] = set()  # tag answers dropped, without their class of client
        for batch in _batches([*gone, *others]):
            with self._db.transact():
                for key in batch:
                    if key[0] != "tag":
                        if still_gone(key[3]):
                            self._db.delete(key)
                        continue
                    value = self._db.get(key)
                    if _points_at(value, names) and still_gone(value[0]):
                        self._db.delete(key)
                        dropped += 1
                        untagged.add(key[:4])
        # A tag's pull time goes with its last answer: kept, one row per tag ever pulled
        # stayed for good under a size cap that evicts short-lived (CI) tags.
        for batch in _batches(untagged):
            with self._db.transact():
                for answers in batch:
                    if all(self._db.get((*answers, accept)) is None for accept in get_args(AcceptClass)):
                        self._db.delete(pulled_key(*answers[1:]))
        return dropped

    def manifest_digests(self) -> set[str]:
        """Every manifest the index knows (tagged or pulled by digest), as text (``sha256:…``):
        a walk's sets hold text, which the garbage collector does not track (see ``mark``)."""
        found = set()
        for key in self._walk():
            if isinstance(key, tuple) and len(key) == 2 and key[0] == "manifest":
                try:
                    found.add(str(parse_digest(key[1])))
                except InvalidReference:
                    continue
        return found
