"""Garbage collection: blobs no stored manifest refers to leave the store.

Mark: every manifest the index knows (tagged or pulled by digest) is a root; an index leads to
its child manifests, an image manifest to its config and layers. Sweep: a stored file that no
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


def _references(body: bytes) -> list[Digest]:
    try:
        document = json.loads(body)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    descriptors = [*document.get("manifests", []), document.get("config") or {}, *document.get("layers", [])]
    found = []
    for descriptor in descriptors:
        try:
            found.append(parse_digest(str(descriptor.get("digest", ""))))
        except (InvalidReference, AttributeError):
            continue
    return found


def collect_garbage(root: Path, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
    store = DirectoryStore(root)
    index = Index(root / "index")
    report = GcReport()
    try:
        roots = index.manifest_digests()
        report.roots = len(roots)
        reachable: set[Digest] = set()
        pending = list(roots)
        while pending:
            digest = pending.pop()
            if digest in reachable:
                continue
            reachable.add(digest)
            body = store.read_small(digest, MAX_MANIFEST_BYTES)
            if body is not None and len(body) <= MAX_MANIFEST_BYTES and body[:1] == b"{":
                pending.extend(d for d in _references(body) if d not in reachable)
        report.reachable = len(reachable)
        young = time.time() - grace_seconds
        for algorithm_dir in store.blobs_dir.iterdir():
            for path in algorithm_dir.glob("*/*"):
                try:
                    digest = parse_digest(f"{algorithm_dir.name}:{path.name}")
                    info = path.stat()
                except (InvalidReference, FileNotFoundError):
                    continue
                if digest in reachable:
                    continue
                if info.st_mtime > young:
                    report.kept_young += 1
                    continue
                if not dry_run:
                    path.unlink(missing_ok=True)
                report.swept.append(str(digest))
                report.swept_bytes += info.st_size
        if report.swept and not dry_run:
            totals = index.store_totals()
            if totals is not None:  # keep the daemon's running totals honest at its next start
                kept = (max(0, totals[0] - report.swept_bytes), max(0, totals[1] - len(report.swept)))
                index.write_batch({}, {}, kept)
    finally:
        index.close()
    return report
