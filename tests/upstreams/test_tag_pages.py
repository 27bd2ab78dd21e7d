"""Listing pages: tag lists an upstream that ignores ``n`` and ``last`` leaves to the cache to
cut, and the next-page link of an upstream's ``Link`` header."""

from __future__ import annotations

import json

import pytest

from moorage.upstreams._pages import next_link, page_of_whole_list


def body(tags: object) -> bytes:
    return json.dumps({"name": "owner/app", "tags": tags}).encode()


@pytest.mark.parametrize(
    ("tags", "n", "last", "page", "next_last"),
    [
        pytest.param(["a", "b", "c"], 2, None, ["a", "b"], "b", id="first_page"),
        pytest.param(["a", "b", "c"], 2, "b", ["c"], None, id="last_page_of_an_upstream_that_ignored_last"),
        pytest.param(["a", "b", "c"], 5, None, ["a", "b", "c"], None, id="all_in_one_page"),
        pytest.param(["c", "d"], 2, "b", ["c", "d"], None, id="the_upstream_s_own_page_after_b"),
        pytest.param(["a", "x\r\nSet-Cookie: y", "c"], 2, None, ["a", "x\r\nSet-Cookie: y", "c"], None, id="no_tag"),
        pytest.param(None, 2, None, None, None, id="no_tags"),
    ],
)
def test_a_page_is_cut_from_a_whole_list_and_never_links_a_bad_tag(
    tags: object, n: int, last: str | None, page: object, next_last: str | None
) -> None:
    """A page's last tag goes into the Link header: a string that is no tag (a CRLF in it)
    leaves the answer as the upstream gave it."""
    cut, following = page_of_whole_list(body(tags), n, last)
    assert json.loads(cut) == {"name": "owner/app", "tags": page}
    assert following == next_last


def test_a_body_that_is_no_tag_list_is_passed_on_as_it_is() -> None:
    for text in (b"not json", b"[1, 2]", b'{"name": "x"}'):
        assert page_of_whole_list(text, 1, None) == (text, None)


@pytest.mark.parametrize(
    ("header", "target"),
    [
        pytest.param('</v2/a/tags/list?last=b&n=2>; rel="next"', "/v2/a/tags/list?last=b&n=2", id="one"),
        pytest.param(
            '</v2/a/tags/list?last=a>; rel="prev", </v2/a/tags/list?last=c>; rel="next"',
            "/v2/a/tags/list?last=c",
            id="second_of_two",
        ),
        pytest.param("</v2/a/tags/list?last=c>;rel=next", "/v2/a/tags/list?last=c", id="unquoted_rel"),
        pytest.param('</v2/a/tags/list?last=a>; rel="prev"', None, id="no_next"),
        pytest.param("", None, id="none"),
    ],
)
def test_the_next_link_is_the_one_marked_next(header: str, target: str | None) -> None:
    """The first link of the header was taken for the next page, whatever its rel."""
    assert next_link(header) == target
