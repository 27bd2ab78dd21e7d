"""Every index key shape, in one place; the builders here are the only way to make a key.

Keys are tuples, never joined strings, so ``("org/a_b",)`` and ``("org_a", "b")`` cannot
collide whatever characters the grammar allows. Values are plain tuples of str/float/bytes so
that the on-disk index does not depend on class paths.

=========================================  =================================================
key                                        value
=========================================  =================================================
("tag", upstream, repository, tag, accept)  (digest, media type, checked at)
("manifest", digest)                        media type of a stored manifest
("blob", digest)                            fingerprint of the file when last known good
("tags", upstream, repository, "", "")      (body, next page's query, fetched at): the whole
                                            tag list (pages are kept in memory only)
("referrers", upstream, repository, d, "")  (body or None: no referrers API, next page's query,
                                            fetched at): the whole list of a manifest stored
                                            and known under that route
("pulled", upstream, repository, tag)       when a client last pulled the tag (epoch seconds)
("image", upstream, repository, digest)     when the manifest was first cached for the repository
("image-pulled", upstream, repository, d)   when a client last pulled the manifest there
("routes", digest)                          ((upstream, repository), ...) the content is known under
("usage",)                                  {upstream: {counter: total}} since the store began
("store",)                                  (bytes, entries) in the blob store
("serving",)                                when a daemon began serving the store; gone after
                                            a clean stop, so found at a start it means a crash
("format",)                                 the layout of these values (``STORE_FORMAT``); a
                                            version refuses a store of a later one
("count-owed",)                             when a process started beside another: what one
                                            that died had not flushed is lost with the one
                                            mark, so the next start alone counts
("pass", task)                              when the scheduled pass ``task`` (gc, lifecycle)
                                            last ran, or was first scheduled: the next is
                                            due an interval after, across restarts
=========================================  =================================================

A change to a value's layout raises ``STORE_FORMAT`` and reads the layouts before it (as
``Index.tags`` reads tag lists of four values): a store goes forward at its next start and
never back, since the version before cannot read what came after it.

Single-flight keys (in memory only) use the same builders: ``tag_key`` for a tag's fetch or
revalidation, ``manifest_flight_key`` for a manifest fetched by digest through one route,
``route_flight_key`` for the upstream HEAD that confirms stored content under a new route.
"""

from __future__ import annotations

from typing import TypeAlias

from moorage.upstreams.reference import AcceptClass, Digest, RepositoryName, Tag

__all__ = [
    "COUNT_OWED_KEY",
    "FORMAT_KEY",
    "SERVING_KEY",
    "STORE_FORMAT",
    "STORE_TOTALS_KEY",
    "USAGE_KEY",
    "IndexKey",
    "blob_key",
    "image_key",
    "image_pulled_key",
    "manifest_flight_key",
    "manifest_key",
    "pulled_key",
    "referrers_key",
    "route_flight_key",
    "routes_key",
    "tag_key",
    "tags_list_key",
]

IndexKey: TypeAlias = tuple[str, ...]


def tag_key(upstream: str, repository: RepositoryName, tag: Tag, accept: AcceptClass) -> IndexKey:
    return ("tag", upstream, str(repository), str(tag), accept)


def manifest_key(digest: Digest) -> IndexKey:
    return ("manifest", str(digest))


def blob_key(digest: Digest) -> IndexKey:
    return ("blob", str(digest))


def manifest_flight_key(upstream: str, repository: RepositoryName, digest: Digest) -> IndexKey:
    return ("manifest-fetch", upstream, str(repository), str(digest))


def routes_key(digest: Digest) -> IndexKey:
    return ("routes", str(digest))


def route_flight_key(upstream: str, repository: RepositoryName, digest: Digest) -> IndexKey:
    return ("route-confirm", upstream, str(repository), str(digest))


def tags_list_key(upstream: str, repository: RepositoryName, query: str) -> IndexKey:
    """``query`` as ``reference.page_query`` writes it; "" for the whole list. The last place,
    once a page's ``last``, stays empty: stores written so keep their whole lists."""
    return ("tags", upstream, str(repository), query, "")


def referrers_key(upstream: str, repository: RepositoryName | str, digest: Digest | str, query: str) -> IndexKey:
    return ("referrers", upstream, str(repository), str(digest), query)


def pulled_key(upstream: str, repository: RepositoryName | str, tag: Tag | str) -> IndexKey:
    return ("pulled", upstream, str(repository), str(tag))


def image_key(upstream: str, repository: RepositoryName | str, digest: Digest | str) -> IndexKey:
    return ("image", upstream, str(repository), str(digest))


def pass_key(task: str) -> IndexKey:
    return ("pass", task)


def image_pulled_key(upstream: str, repository: RepositoryName | str, digest: Digest | str) -> IndexKey:
    return ("image-pulled", upstream, str(repository), str(digest))


USAGE_KEY: IndexKey = ("usage",)
STORE_TOTALS_KEY: IndexKey = ("store",)
SERVING_KEY: IndexKey = ("serving",)
FORMAT_KEY: IndexKey = ("format",)
COUNT_OWED_KEY: IndexKey = ("count-owed",)
#: The layout of the index's values that this version writes (and every earlier one it reads).
STORE_FORMAT = 1
