"""Garbage collection: blobs no stored manifest refers to leave the store.

Mark: every manifest the index knows (tagged or pulled by digest) is a root; an index leads to
its child manifests, an image manifest to its config and layers. Only manifests are read,
never a layer. Sweep: a stored file that no
root reaches and that is older than the grace period (default 1 h, so a pull in progress
whose manifest is not stored yet is never swept) is removed. Manifests with an index entry are
never swept here (the size cap and lifecycle rules decide about them). Blocking; safe beside a
serving daemon: what is swept by mistake is fetched again on the next pull.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from moorage.upstreams.reference import MAX_MANIFEST_BYTES, Digest, InvalidReference, descriptors, parse_digest

from ._clock import within
from ._evict import ReadGuard, release
from ._index import Index
from ._layout import index_dir
from ._store import BlobStore, DirectoryStore

__all__ = ["GcReport", "Platform", "collect_garbage", "index_platforms", "mark", "parts", "references", "sweep"]


@dataclass
class GcReport:
    roots: int = 0
    reachable: int = 0
    swept: list[str] = field(default_factory=list)
    swept_bytes: int = 0
    kept_young: int = 0


def references(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """(child manifests, config and layers) a manifest refers to."""
    children, config, layers = parts(body)
    return children, config + layers


def parts(body: bytes, *, distributable: bool = False) -> tuple[list[Digest], list[Digest], list[Digest]]:
    """(child manifests, config, layers) a manifest refers to, each in the manifest's order;
    nothing for a body that is not one. The ``blobs`` of an OCI artifact manifest (the type
    ORAS 1.0 and notation wrote, which ACR, Zot and Harbor still serve) count as layers.
    ``distributable`` leaves out foreign layers, those with ``urls``: their registry is not the
    one the manifest came from."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return [], [], []
    if not isinstance(document, dict):
        return [], [], []

    def digests(listed: list[dict[str, Any]]) -> list[Digest]:
        found = []
        for descriptor in listed:
            if distributable and descriptor.get("urls"):
                continue
            try:
                found.append(parse_digest(descriptor["digest"]))
            except InvalidReference:
                continue
        return found

    config = document.get("config")
    return (
        digests(descriptors(document, "manifests")),
        digests([config] if isinstance(config, dict) else []),
        digests(descriptors(document, "layers") + descriptors(document, "blobs")),
    )


def subject_of(body: bytes) -> Digest | None:
    """The manifest a referrer (a signature, an SBOM, an attestation) names as its ``subject``;
    None for a manifest that names none."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    subject = document.get("subject") if isinstance(document, dict) else None
    if not isinstance(subject, dict):
        return None
    try:
        return parse_digest(str(subject.get("digest", "")))
    except InvalidReference:
        return None


def default_platform(body: bytes) -> Digest | None:
    """The manifest an index names for linux/amd64 (its first such entry), which Docker Hub and
    Distribution answer a client that takes no index with; None for anything else."""
    return next((digest for digest, platform in index_platforms(body).items() if platform[:2] == LINUX_AMD64), None)


#: A platform as an index entry gives it, as a client matches it: os, architecture, variant
#: (arm64's unsaid one is v8, arm's v7) and the os.version's major.minor.build (a Windows node
#: takes the entry of its own build; the revision changes with every patch release).
Platform = tuple[str, str, str, str]
_DEFAULT_VARIANTS: Final = {"arm64": "v8", "arm": "v7"}
LINUX_AMD64: Final = ("linux", "amd64")


def index_platforms(body: bytes) -> dict[Digest, Platform]:
    """The manifests an index lists with a platform, and each one's; {} for a manifest that
    is no index, or that cannot be read."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    entries = document.get("manifests") if isinstance(document, dict) else None
    found: dict[Digest, Platform] = {}
    for entry in entries if isinstance(entries, list) else []:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        try:
            digest = parse_digest(str(entry.get("digest", "")))
        except InvalidReference:
            continue
        os_name, architecture, variant, version = (
            str(platform.get(key) or "") for key in ("os", "architecture", "variant", "os.version")
        )
        variant = variant or _DEFAULT_VARIANTS.get(architecture, "")
        found[digest] = (os_name, architecture, variant, ".".join(version.split(".")[:3]))
    return found


def mark(store: BlobStore, roots: Iterable[str]) -> set[str]:
    """Every blob the ``roots`` manifests reach (themselves included), as digest text
    (``sha256:…``); reads only manifests.

    Text, not :class:`Digest` objects: Python's cyclic garbage collector tracks every Digest,
    and with a million of them held, each of its full passes (run by whichever thread
    allocates, the event loop's too) paused the daemon for most of a second."""
    reachable: set[str] = set()
    manifests = list(roots)
    while manifests:
        text = manifests.pop()
        if text in reachable:
            continue
        reachable.add(text)
        try:
            body = store.read_small(parse_digest(text), MAX_MANIFEST_BYTES)
        except InvalidReference:
            continue
        if body is not None and len(body) <= MAX_MANIFEST_BYTES:
            children, blobs = references(body)
            manifests.extend(child for child in map(str, children) if child not in reachable)
            reachable.update(map(str, blobs))
    return reachable


def sweep(
    store: DirectoryStore,
    index: Index,
    *,
    grace_seconds: float,
    dry_run: bool = False,
    protected: frozenset[Digest] = frozenset(),
    accessed: Mapping[Digest, float] | None = None,
    guard: ReadGuard | None = None,
    report: GcReport | None = None,
) -> GcReport:
    """One collection over an open store and index. Blocks; safe beside serving: a blob being
    filled (``protected``), read within the grace period (``accessed``, the live map), found
    by a client in the last seconds (``guard``), or reached by a manifest stored while the walk
    ran, is kept. ``report`` (a new one by default) is filled as it goes: a pass interrupted
    (Ctrl-C) has forgotten, and reports, what it removed."""
    report = report if report is not None else GcReport()
    roots = index.manifest_digests()
    report.roots = len(roots)
    reachable = mark(store, roots)
    candidates: list[tuple[str, int]] = []  # digest text and size: untracked, as in ``mark``
    for blob in store.entries():
        text = str(blob.digest)
        if text in reachable or blob.digest in protected:
            continue
        now = time.time()  # read per blob: a walk of a large store takes minutes
        if within(blob.mtime, now, grace_seconds) or within((accessed or {}).get(blob.digest, 0.0), now, grace_seconds):
            report.kept_young += 1
            continue
        candidates.append((text, blob.size))
    if candidates:  # manifests stored while the store was walked are roots too
        reachable |= mark(store, index.manifest_digests() - roots)
    report.reachable = len(reachable)
    swept: set[Digest] = set()
    guard = guard or ReadGuard()
    try:
        for text, size in candidates:
            if text in reachable:
                continue
            digest = parse_digest(text)
            if not dry_run and guard.remove_unless_read(store.path_of(digest), digest) is None:
                continue
            swept.add(digest)
            report.swept.append(text)
            report.swept_bytes += size
    finally:
        if swept and not dry_run:
            index.forget(swept)
    release(reachable)
    return report


def collect_garbage(root: Path, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
    """``moorage gc``: one collection of the store under ``root``, beside or without a daemon."""
    store = DirectoryStore(root)
    index = Index(index_dir(root))
    report = GcReport()
    try:
        sweep(store, index, grace_seconds=grace_seconds, dry_run=dry_run, report=report)
    finally:  # interrupted too: what was removed leaves the totals, or they stay above the store's
        try:
            if report.swept and not dry_run and index.store_totals() is not None:
                # A daemon serving this store picks the change up at its next flush.
                index.write_batch({}, {}, (-report.swept_bytes, -len(report.swept)))
        finally:
            index.close()
    return report
