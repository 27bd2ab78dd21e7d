"""What an upstream's listings say: tag-list pages, referrers lists and their next-page links.

Pure functions over answers already read; ``_client`` does the HTTP. A listing goes on to
clients, so whatever of it lands in a header of ours (a next page's query) is checked against
``reference.page_query``'s bounds first and percent-encoded, and dropped when it does not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .reference import is_page_size, page_query

__all__ = [
    "ReferrersPage",
    "TagsPage",
    "artifact_type_only",
    "cut_tags_page",
    "error_codes",
    "error_message",
    "next_link",
    "of_artifact_type",
    "page_of_whole_list",
    "referrers_page",
    "tags_page",
]


@dataclass(frozen=True, slots=True)
class TagsPage:
    body: bytes
    #: The query of the next page (as ``reference.page_query`` writes it), if any.
    next_query: str | None
    #: The upstream announced a next page whose query is out of bounds: not offered.
    next_dropped: bool = False


@dataclass(frozen=True, slots=True)
class ReferrersPage:
    """An OCI image index of the manifests whose ``subject`` is a digest."""

    body: bytes
    #: How many it lists.
    listed: int
    #: The query of the upstream's next page (as ``reference.page_query`` writes it), if any.
    next_query: str | None
    #: The upstream announced a next page whose query is out of bounds: not offered.
    next_dropped: bool = False


def next_link(header: str) -> str | None:
    """The target of the ``rel="next"`` link in a ``Link`` header, if there is one."""
    for link in header.split(","):
        target, *parameters = (part.strip() for part in link.split(";"))
        if not (target.startswith("<") and target.endswith(">")):
            continue
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "rel" and "next" in value.strip().strip('"').lower().split():
                return target[1:-1]
    return None


def tags_page(body: bytes, link: str, query: str) -> TagsPage:
    """A tag-list answer (``body``, its ``Link`` header) to a request with ``query``
    (canonical, as ``reference.page_query`` writes it). The upstream's next page goes on as
    its query, opaque (``last`` and ``n``, or a token of the upstream's own, as Quay's
    ``next_page``), without ``ns`` (the cache's own routing parameter) and without an ``n``
    that is no page size (a client sending it back would be refused). Where the upstream
    announced no next page and the client asked for a page, the list is cut here where the
    upstream ignored ``n`` and ``last`` (Distribution 2.x answers every tag), as
    ``page_of_whole_list`` tells; where the client asked for the whole list, its tags are put
    in lexical order (``in_lexical_order``)."""
    target = next_link(link)
    if target is not None:
        following = [
            (name, value)
            for name, value in parse_qsl(_query_of(target), keep_blank_values=True)
            if name != "ns" and not (name == "n" and not is_page_size(value))
        ]
        next_query = page_query(following) or None
        return TagsPage(body, next_query, next_dropped=next_query is None)
    return cut_tags_page(body, query)


def cut_tags_page(body: bytes, query: str, *, whole: bool = False) -> TagsPage:
    """The page a tag-list ``query`` asks for with ``n`` and ``last``, cut from the list in
    ``body`` as ``page_of_whole_list`` does (``whole``: the list is known to be whole), with
    the query of the page after it."""
    parameters = dict(parse_qsl(query, keep_blank_values=True))
    n, last = parameters.get("n"), parameters.get("last")
    size = int(n) if n is not None and is_page_size(n) else None
    if size is None and last is None:
        return TagsPage(body if query else in_lexical_order(body), None)
    body, page_end = page_of_whole_list(body, size, last, whole=whole)
    return TagsPage(body, None if page_end is None else page_query([("last", page_end), ("n", str(size))]))


def page_of_whole_list(
    body: bytes, n: int | None, last: str | None, *, whole: bool = False
) -> tuple[bytes, str | None]:
    """(the tag list ``body`` as the page a client asking for ``n`` tags after ``last``
    should get, the ``last`` of the next page or None). The distribution spec's page: the
    tags lexically after ``last``, in lexical order, at most ``n`` of them, cut from a list
    that is ``whole``, or from an upstream's answer that shows it ignored ``n`` or ``last``
    (more than ``n`` tags, or a tag not after ``last``). Any other answer is the upstream's
    own page, in its own order (ECR's is not lexical), left as it is; so is a body that is no
    tag list, or holds something other than strings."""
    listed = _tag_list(body)
    if listed is None:
        return body, None
    document, tags = listed
    ignored = (n is not None and len(tags) > n) or (last is not None and any(_not_after(tag, last) for tag in tags))
    if not (whole or ignored):
        return body, None
    after = sorted(tag for tag in tags if last is None or tag > last)
    # A page holds the name and its tags: gcr.io's map of every digest would make each page as
    # large as the whole list.
    name = {"name": document["name"]} if "name" in document else {}
    if n is not None and len(after) > n:
        if n == 0:
            return json.dumps({**name, "tags": []}).encode(), None
        return json.dumps({**name, "tags": after[:n]}).encode(), after[n - 1]
    if after == tags:
        return body, None
    return json.dumps({**name, "tags": after}).encode(), None


def in_lexical_order(body: bytes) -> bytes:
    """A whole tag list with its tags in lexical order, as the distribution spec has every
    list (Distribution 2.x answers in its storage's order); the rest of it as it was (gcr.io's
    map of digests). A body that is no tag list is left as it is."""
    listed = _tag_list(body)
    if listed is None:
        return body
    document, tags = listed
    ordered = sorted(tags)
    return body if ordered == tags else json.dumps({**document, "tags": ordered}).encode()


def _tag_list(body: bytes) -> tuple[dict[str, Any], list[str]] | None:
    """(the document, its tags) of a tag list; None for a body that is none, or whose tags
    are not all strings."""
    try:
        document = json.loads(body)
        tags = document["tags"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: nested too deep
        return None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return None
    return document, tags


def _not_after(tag: str, last: str) -> bool:
    """Whether an answer that holds ``tag`` shows the upstream ignored ``last``: the tag is
    not after it by code point nor without regard to case (a registry may sort either way).
    ``last`` itself among them is the plainest such answer (Distribution 2.x answers every
    tag); a tag deleted since the client's last page, or one that never was, shows it too."""
    return tag <= last and tag.casefold() <= last.casefold()


def referrers_page(body: bytes, link: str, query: str, filtered: bool) -> ReferrersPage | None:
    """A referrers answer (``body``, its ``Link`` header) to a request with ``query``, or None
    when ``body`` is no image index. An ``artifactType`` asked for that the upstream did not
    filter by (it says so in ``OCI-Filters-Applied``: ``filtered``) is filtered here, so the
    page always holds only that type, and so do the pages after it. The next page's query
    goes on without ``ns`` (the cache's own routing parameter, not the upstream's); one that
    does not fit ``page_query``'s bounds is not offered, and ``next_dropped`` says so."""
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return None
    listed = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(listed, list) or not all(isinstance(entry, dict) for entry in listed):
        return None
    wanted = dict(parse_qsl(query)).get("artifactType")
    if wanted is not None and not filtered:
        listed, body = _of_type(document, wanted)
    target = next_link(link)
    if target is None:
        return ReferrersPage(body, len(listed), None)
    following = [(name, value) for name, value in parse_qsl(_query_of(target)) if name != "ns"]
    if wanted is not None and "artifactType" not in dict(following):
        following.append(("artifactType", wanted))
    next_query = page_query(following) or None
    return ReferrersPage(body, len(listed), next_query, next_dropped=next_query is None)


def of_artifact_type(body: bytes, artifact_type: str) -> bytes:
    """A referrers list (as ``referrers_page`` passed it) cut to the entries of one type."""
    return _of_type(json.loads(body), artifact_type)[1]


def _of_type(document: dict[str, Any], artifact_type: str) -> tuple[list[dict[str, Any]], bytes]:
    """(the entries of ``artifact_type``, the referrers list ``document`` cut to them)."""
    listed = [entry for entry in document["manifests"] if entry.get("artifactType") == artifact_type]
    return listed, json.dumps({**document, "manifests": listed}).encode()


def artifact_type_only(query: str) -> str | None:
    """The ``artifactType`` of a referrers query that asks for nothing else (no page)."""
    parameters = parse_qsl(query)
    if len(parameters) == 1 and parameters[0][0] == "artifactType":
        return parameters[0][1]
    return None


def error_codes(body: bytes) -> set[str]:
    """The codes of an OCI error body (``{"errors": [{"code": ...}]}``); none for another."""
    return {error["code"] for error in _errors(body) if isinstance(error.get("code"), str)}


def error_message(body: bytes) -> str | None:
    """The first message of an OCI error body, printable and at most 200 characters; None
    for another body, or one whose message is empty."""
    errors = _errors(body)
    message = errors[0].get("message") if errors else None
    if not isinstance(message, str):
        return None
    printable = "".join(character for character in message if character.isprintable())[:200].strip()
    return printable or None


def _errors(body: bytes) -> list[dict[str, Any]]:
    """The error objects of an OCI error body; none for another body."""
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return []
    errors = document.get("errors") if isinstance(document, dict) else None
    return [error for error in errors if isinstance(error, dict)] if isinstance(errors, list) else []


def _query_of(target: str) -> str:
    """The query of a link's target; "" for a target that is no URL (``http://[x/``)."""
    try:
        return urlsplit(target).query
    except ValueError:
        return ""
