"""Reading ``/v2/...`` request paths, from the raw (still percent-encoded) path.

aiohttp decodes ``%2F`` to ``/`` in ``match_info``, so the route is read from
``request.raw_path``; any ``%`` (an encoded slash, dot or NUL) is refused outright, because
nothing in the spec grammar needs one. The name is the longest prefix before the last
``/manifests/``, ``/blobs/``, ``/tags/list`` or ``/referrers/``, so a repository may itself
contain a component called ``manifests``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final, Literal

from moorage.upstreams.reference import ErrorKind, InvalidReference

__all__ = ["PathKind", "V2Path", "parse_v2_path"]

PathKind = Literal["manifest", "blob", "upload", "tags", "referrers"]

#: Each kind with the text its paths must contain (a cheap test before the pattern).
_PATTERNS: Final[tuple[tuple[PathKind, str, re.Pattern[str]], ...]] = (
    ("upload", "/blobs/uploads", re.compile(r"/v2/(?P<name>.+)/blobs/uploads(?:/(?P<ref>[^/]*))?/?")),
    ("manifest", "/manifests/", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("blob", "/blobs/", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("tags", "/tags/list", re.compile(r"/v2/(?P<name>.+)/tags/list")),
    ("referrers", "/referrers/", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
)


@dataclass(frozen=True, slots=True)
class V2Path:
    kind: PathKind
    #: The client's name, unparsed (routing parses it).
    name: str
    reference: str


def parse_v2_path(raw_path: str) -> V2Path | None:
    """What a ``/v2/<name>/...`` path asks for; None for no known route. Every request asks,
    and the same tags are pulled over and over: the answers for the last few thousand paths
    of ordinary length are kept (a longer one is parsed afresh and not kept in memory, nor is
    a refusal)."""
    path = raw_path.split("?", 1)[0]
    if len(path) <= _REMEMBERED_PATH_LENGTH:
        return _parse(path)
    return _parse.__wrapped__(path)


#: Longer paths than this are parsed afresh each time, so the kept answers take at most about
#: 4,096 x (2 x 256) bytes of text.
_REMEMBERED_PATH_LENGTH: Final = 256


#: What a reference is called in the error for each kind of path that has one.
_REFERENCE_KINDS: Final[dict[PathKind, ErrorKind]] = {"manifest": "reference", "blob": "digest", "referrers": "digest"}


@functools.lru_cache(maxsize=4096)
def _parse(path: str) -> V2Path | None:
    for kind, marker, pattern in _PATTERNS:
        match = pattern.fullmatch(path) if marker in path else None
        if match:
            found = V2Path(kind, match.group("name"), match.groupdict().get("ref") or "")
            break
    else:
        found = None
    if "%" in path or "\x00" in path:
        # The part that holds it is named: a tag with an encoded space is a bad tag, not a
        # bad repository name.
        if found is not None and "%" not in found.name and "\x00" not in found.name and kind in _REFERENCE_KINDS:
            raise InvalidReference(_REFERENCE_KINDS[kind], found.reference, "no percent-encoded characters")
        raise InvalidReference("name", path[4:], "no percent-encoded characters in a repository path")
    return found
