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
from dataclasses import dataclass, field
from pathlib import Path

from moorage.upstreams.reference import MAX_MANIFEST_BYTES, Digest, InvalidReference, parse_digest

from ._index import Index
from ._store import DirectoryStore

__all__ = ["GcReport", "collect_garbage"]


@dataclass
class GcReport:
    roots: int = 0
    reachable: int = 0
    swept: list[str] = field(default_factory=list)
    swept_bytes: int = 0
    kept_young: int = 0


def _references(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """(child manifests, config and layers) a manifest refers to."""
    try:
        document = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(document, dict):
        return [], []

    def digests(descriptors: list[object]) -> list[Digest]:
        found = []
        for descriptor in descriptors:
            try:
                found.append(parse_digest(str(descriptor.get("digest", ""))))  # type: ignore[attr-defined]
            except (InvalidReference, AttributeError):
                continue
        return found

    children = digests(list(document.get("manifests", [])))
    return children, digests([document.get("config") or {}, *document.get("layers", [])])


def collect_garbage(root: Path, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
    store = DirectoryStore(root)
    index = Index(root / "index")
    report = GcReport()
    try:
        roots = index.manifest_digests()
        report.roots = len(roots)
        reachable: set[Digest] = set()
        manifests = list(roots)
        while manifests:  # only manifests are read; configs and layers are only marked
            digest = manifests.pop()
            if digest in reachable:
                continue
            reachable.add(digest)
            body = store.read_small(digest, MAX_MANIFEST_BYTES)
            if body is not None and len(body) <= MAX_MANIFEST_BYTES:
                children, blobs = _references(body)
                manifests.extend(d for d in children if d not in reachable)
                reachable.update(blobs)
        report.reachable = len(reachable)
        young = time.time() - grace_seconds
        for blob in store.entries():
            if blob.digest in reachable:
                continue
            if blob.mtime > young:
                report.kept_young += 1
                continue
            if not dry_run:
                blob.path.unlink(missing_ok=True)
            report.swept.append(str(blob.digest))
            report.swept_bytes += blob.size
        if report.swept and not dry_run:
            totals = index.store_totals()
            if totals is not None:  # keep the daemon's running totals honest at its next start
                kept = (max(0, totals[0] - report.swept_bytes), max(0, totals[1] - len(report.swept)))
                index.write_batch({}, {}, kept)
    finally:
        index.close()
    return report
