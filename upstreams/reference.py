"""The OCI distribution vocabulary: repository names, tags, digests and media types.

This is a leaf module. It imports nothing from moorage and no HTTP library, so every room
(proxy, cache, upstreams) may use it. The grammar is the distribution spec's; only the
parsers here construct a :class:`RepositoryName`, :class:`Tag` or :class:`Digest`, and only
those types may become part of a file path or an upstream URL. A value that fails to parse
raises :class:`InvalidReference` whose ``kind`` tells which OCI error code fits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlencode

__all__ = [
    "ACCEPT_ALL_MANIFESTS",
    "ACCEPT_IMAGE_MANIFESTS",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_MANIFEST_V1",
    "DOCKER_MANIFEST_V1_SIGNED",
    "DOCKER_MANIFEST_V2",
    "INDEX_MEDIA_TYPES",
    "MAX_MANIFEST_BYTES",
    "MAX_QUERY_LENGTH",
    "MAX_QUERY_PARAMETERS",
    "OCI_IMAGE_INDEX",
    "OCI_IMAGE_MANIFEST",
    "SCHEMA1_MEDIA_TYPES",
    "AcceptClass",
    "Digest",
    "ImageReference",
    "InvalidReference",
    "Reference",
    "RepositoryName",
    "Tag",
    "accept_class",
    "descriptors",
    "is_manifest_document",
    "is_media_type",
    "is_page_size",
    "is_tag",
    "page_query",
    "parse_digest",
    "parse_image_reference",
    "parse_reference",
    "parse_repository",
    "parse_tag",
    "sniff_media_type",
]

DOCKER_MANIFEST_V2: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_IMAGE_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_IMAGE_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_V1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1: Final = "application/vnd.docker.distribution.manifest.v1+json"
#: Docker's image manifest schema 1, deprecated since 2019: current clients no longer pull it.
SCHEMA1_MEDIA_TYPES: Final = frozenset({DOCKER_MANIFEST_V1_SIGNED, DOCKER_MANIFEST_V1})

INDEX_MEDIA_TYPES: Final = frozenset({DOCKER_MANIFEST_LIST, OCI_IMAGE_INDEX})
IMAGE_MEDIA_TYPES: Final = frozenset({DOCKER_MANIFEST_V2, OCI_IMAGE_MANIFEST})

#: What we send upstream for a client that accepts indexes: every manifest type we serve.
ACCEPT_ALL_MANIFESTS: Final = ", ".join([OCI_IMAGE_INDEX, DOCKER_MANIFEST_LIST, OCI_IMAGE_MANIFEST, DOCKER_MANIFEST_V2])
#: What we send upstream for a client that accepts only image manifests (the upstream then
#: resolves an index to its default platform, as Docker Hub does).
ACCEPT_IMAGE_MANIFESTS: Final = ", ".join([OCI_IMAGE_MANIFEST, DOCKER_MANIFEST_V2])

#: Manifests above this size are refused (the limit distribution and containerd apply).
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024

MAX_NAME_LENGTH: Final = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_ALGORITHMS: Final = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

ErrorKind = Literal["name", "tag", "digest", "reference"]


class InvalidReference(ValueError):
    """A name, tag, digest or reference that does not follow the distribution grammar."""

    def __init__(self, kind: ErrorKind, value: str, expected: str) -> None:
        self.kind: ErrorKind = kind
        self.value = value
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid {kind} {shown!r}: expected {expected}")


class RepositoryName(str):
    """A repository name that matched the spec grammar (``library/alpine``)."""

    __slots__ = ()


class Tag(str):
    """A tag that matched the spec grammar (``3.19``)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest, ``algorithm:encoded``; sha256 and sha512 are understood."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.encoded

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


Reference = Tag | Digest


def parse_repository(value: str) -> RepositoryName:
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidReference("name", value, f"at most {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(value):
        raise InvalidReference(
            "name", value, "lowercase components [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'"
        )
    return RepositoryName(value)


def parse_tag(value: str) -> Tag:
    if not _TAG_RE.fullmatch(value):
        raise InvalidReference("tag", value, "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
    return Tag(value)


def parse_digest(value: str) -> Digest:
    algorithm, sep, encoded = value.partition(":")
    pattern = _DIGEST_ALGORITHMS.get(algorithm)
    if not sep or pattern is None:
        raise InvalidReference("digest", value, "sha256:<64 lowercase hex> or sha512:<128 lowercase hex>")
    if not pattern.fullmatch(encoded):
        raise InvalidReference("digest", value, f"{algorithm}:<{64 if algorithm == 'sha256' else 128} lowercase hex>")
    return Digest(algorithm, encoded)


def parse_reference(value: str) -> Reference:
    """A tag or a digest, as it appears after ``/manifests/``."""
    if ":" in value:
        return parse_digest(value)
    return parse_tag(value)


AcceptClass = Literal["index", "image"]


def accept_class(accept_header_values: list[str]) -> AcceptClass:
    """Which class of manifest a client can take, from its Accept header(s).

    ``index``: the client takes manifest lists / OCI indexes (or sent no preference at all),
    so we may answer with whatever the upstream holds for the tag. ``image``: it names manifest
    types but no index type, so a multi-platform tag must be answered with one platform's image.
    A client sends the same header on every pull, so answers for headers of ordinary size are
    remembered (a bounded few; a huge header is classified afresh, and not kept in memory).
    """
    values = tuple(accept_header_values)
    if len(values) <= _REMEMBERED_ACCEPT_VALUES and sum(map(len, values)) <= _REMEMBERED_ACCEPT_BYTES:
        return _accept_class(values)
    return _accept_class.__wrapped__(values)


_REMEMBERED_ACCEPT_VALUES: Final = 8
_REMEMBERED_ACCEPT_BYTES: Final = 2048


@functools.lru_cache(maxsize=256)
def _accept_class(accept_header_values: tuple[str, ...]) -> AcceptClass:
    types: set[str] = set()
    for value in accept_header_values:
        for part in value.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    if not types or "*/*" in types or types & INDEX_MEDIA_TYPES:
        return "index"
    if types & (IMAGE_MEDIA_TYPES | {DOCKER_MANIFEST_V1_SIGNED, "application/json"}):
        return "image"
    return "index"


_PAGE_SIZE_RE: Final = re.compile(r"[0-9]{1,6}")


def is_tag(value: str) -> bool:
    """Whether ``value`` follows the tag grammar (as :func:`parse_tag` checks)."""
    return _TAG_RE.fullmatch(value) is not None


def is_page_size(value: str) -> bool:
    """A tag list's ``n``: ASCII digits, at most six (``str.isdigit`` takes ``²`` too)."""
    return _PAGE_SIZE_RE.fullmatch(value) is not None


_MEDIA_TYPE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_QUERY_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_QUERY_VALUE_RE: Final = re.compile(r"[\x20-\x7e]*")
#: Parameters of a referrers query: ``artifactType`` and an upstream's own paging ones.
MAX_QUERY_PARAMETERS: Final = 8
#: Characters of a referrers query as ``page_query`` writes it (an upstream's continuation
#: token may take a few hundred; a media type up to 255).
MAX_QUERY_LENGTH: Final = 4096


def is_media_type(value: str) -> bool:
    """A media type such as an ``artifactType``: ``type/subtype`` by RFC 6838's names."""
    return _MEDIA_TYPE_RE.fullmatch(value) is not None


def page_query(parameters: Iterable[tuple[str, str]]) -> str | None:
    """A listing's query (a referrers request's ``artifactType`` and an upstream's paging
    parameters, opaque to the cache) in one form: sorted and percent-encoded, fit to key the
    cache, to go to the upstream and into a ``Link`` header. None for more than
    ``MAX_QUERY_PARAMETERS``, a name given twice, a name of more than 32 characters or a value
    of other than printable ASCII, an ``artifactType`` that is no media type, or a query longer
    than ``MAX_QUERY_LENGTH`` in all."""
    ordered = sorted(parameters)
    names = [name for name, _ in ordered]
    if len(ordered) > MAX_QUERY_PARAMETERS or len(set(names)) != len(names):
        return None
    for name, value in ordered:
        if not _QUERY_NAME_RE.fullmatch(name) or not _QUERY_VALUE_RE.fullmatch(value):
            return None
        if name == "artifactType" and not is_media_type(value):
            return None
    query = urlencode(ordered)
    return query if len(query) <= MAX_QUERY_LENGTH else None


def descriptors(document: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The descriptors a parsed manifest lists under ``key`` (``manifests``, ``layers``, an
    artifact manifest's ``blobs``): none where Go wrote an empty list as null, and no entry
    that is not an object with a digest."""
    listed = document.get(key)
    if not isinstance(listed, list):
        return []
    return [entry for entry in listed if isinstance(entry, dict) and isinstance(entry.get("digest"), str)]


def is_manifest_document(body: bytes) -> bool:
    """Whether ``body`` is shaped like an image manifest or index (a JSON object with a
    ``schemaVersion``), not a layer or an image config stored under the same kind of digest."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return False
    return isinstance(document, dict) and isinstance(document.get("schemaVersion"), int)


def sniff_media_type(body: bytes) -> str:
    """The media type a manifest declares, or the one its shape implies."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return DOCKER_MANIFEST_V2
    if not isinstance(document, dict):
        return DOCKER_MANIFEST_V2
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if document.get("schemaVersion") == 1:  # schema 1 declares no media type
        return DOCKER_MANIFEST_V1_SIGNED if "signatures" in document else DOCKER_MANIFEST_V1
    if "manifests" in document:
        return OCI_IMAGE_INDEX
    return OCI_IMAGE_MANIFEST


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A full image name as people write it: ``[registry/]repository[:tag][@digest]``."""

    registry: str
    repository: RepositoryName
    reference: Reference

    def __str__(self) -> str:
        separator = "@" if isinstance(self.reference, Digest) else ":"
        return f"{self.registry}/{self.repository}{separator}{self.reference}"


def parse_image_reference(value: str, default_registry: str = "docker.io") -> ImageReference:
    """``alpine`` → docker.io/library/alpine:latest; ``ghcr.io/o/a@sha256:…``; ``host:5000/a:1``."""
    rest, at, digest = value.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = default_registry, rest
    name, colon, tag = path.rpartition(":") if ":" in path else (path, "", "")
    repository = parse_repository(name)
    if registry == "docker.io" and "/" not in repository:
        repository = RepositoryName(f"library/{repository}")
    reference: Reference = parse_digest(digest) if at else parse_tag(tag if colon else "latest")
    return ImageReference(registry, repository, reference)
