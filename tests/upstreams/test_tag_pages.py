"""Listing pages: tag lists an upstream that ignores ``n`` and ``last`` leaves to the cache to
cut, and the next-page link of an upstream's ``Link`` header."""

from __future__ import annotations

import json

import pytest

from moorage.upstreams._pages import next_link, page_of_whole_list, tags_page


def body(tags: object) -> bytes:
    return json.dumps({"name": "owner/app", "tags": tags}).encode()


@pytest.mark.parametrize(
    ("tags", "n", "last", "page", "next_last"),
    [
        pytest.param(["zeta", "yank"], 2, "mike", ["zeta", "yank"], None, id="the_upstream_s_own_last_page_unsorted"),
        pytest.param(["a", "b", "c"], 2, None, ["a", "b"], "b", id="first_page"),
        pytest.param(["a", "b", "c"], 2, "b", ["c"], None, id="last_page_of_an_upstream_that_ignored_last"),
        pytest.param(["a", "b", "c"], 5, None, ["a", "b", "c"], None, id="all_in_one_page"),
        pytest.param(["c", "d"], 2, "b", ["c", "d"], None, id="the_upstream_s_own_page_after_b"),
        pytest.param(["t19", "t07", "t18"], 2, None, ["t07", "t18"], "t18", id="lexical_order"),
        pytest.param(["a", "c", "d"], 2, "b", ["c", "d"], None, id="after_a_last_that_is_gone"),
        pytest.param(["a", "b", "c"], 2, "zzz", [], None, id="after_the_end"),
        pytest.param(["c", "a", "b"], None, "a", ["b", "c"], None, id="last_without_n"),
        # Distribution 2.x answers every tag, in its storage's order: a last that is no tag
        # (deleted since the client's previous page) was not noticed, and the client got the
        # whole list again, tags before last and all.
        pytest.param(
            ["b", "latest", "x-1", "Z", "2", "c", "10", "y_2", "a"],
            10,
            "b0",
            ["c", "latest", "x-1", "y_2"],
            None,
            id="after_a_last_that_is_no_tag",
        ),
        pytest.param(["b", "Z", "a"], None, "zzz", [], None, id="after_the_end_without_n"),
        pytest.param(["c", "Z"], 5, "b", ["c", "Z"], None, id="a_page_sorted_without_regard_to_case"),
        pytest.param(["a", "b"], 0, None, [], None, id="none_asked_for"),
        pytest.param(["a", 1, "c"], 2, None, ["a", 1, "c"], None, id="not_all_strings"),
        pytest.param(None, 2, None, None, None, id="no_tags"),
    ],
)
def test_a_page_is_the_tags_lexically_after_last(
    tags: object, n: int | None, last: str | None, page: object, next_last: str | None
) -> None:
    """The distribution spec's page: at most n tags, lexically after last, in lexical order.
    A last that was no tag in the list restarted at the first page, and a client following
    Link got its tags twice; an upstream's unsorted list gave pages in no order. An answer that
    shows the upstream paged it (ECR's pages are not lexical) is its own, kept as it is: cut,
    its last page lost the tags that sort before last."""
    cut, following = page_of_whole_list(body(tags), n, last)
    assert json.loads(cut) == {"name": "owner/app", "tags": page}
    assert following == next_last


@pytest.mark.parametrize(
    ("link", "query", "dropped"),
    [
        pytest.param('</v2/a/tags/list?n=100&next_page=tok%2B1>; rel="next"', "n=100&next_page=tok%2B1", False),
        pytest.param('</v2/a/tags/list?last=b&n=2&ns=evil.example>; rel="next"', "last=b&n=2", False, id="no_ns"),
        pytest.param('</v2/a/tags/list?last=b&n=two>; rel="next"', "last=b", False, id="n_no_page_size"),
        pytest.param('</v2/a/tags/list?last=a%0d%0aSet-Cookie:%20x>; rel="next"', None, True, id="control_character"),
        pytest.param('</v2/a/tags/list?last=a>b>; rel="next"', "last=a%3Eb", False, id="angle_bracket"),
    ],
)
def test_an_upstream_next_page_goes_on_as_its_query_percent_encoded(
    link: str, query: str | None, dropped: bool
) -> None:
    """Quay's next page is a next_page token, with no last: passed on only as a tag and a
    count, it was dropped, and a client saw the first page of every list."""
    page = tags_page(body(["a", "b"]), link, "n=2")
    assert (page.next_query, page.next_dropped) == (query, dropped)
    assert json.loads(page.body)["tags"] == ["a", "b"], "the upstream's own page, as it is"


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


def test_a_page_cut_holds_the_name_and_its_tags_alone() -> None:
    """gcr.io adds a map of every digest of the repository: kept, each page of 10 tags was as
    large as the whole list."""
    listed = {"name": "owner/app", "tags": ["a", "b", "c"], "manifest": {"sha256:x": {"tag": ["a", "b", "c"]}}}
    cut, following = page_of_whole_list(json.dumps(listed).encode(), 2, None)
    assert (json.loads(cut), following) == ({"name": "owner/app", "tags": ["a", "b"]}, "b")


def test_a_whole_list_kept_is_cut_whatever_it_holds() -> None:
    """A page cut from the whole list kept while the upstream is down: no upstream paged it."""
    cut, following = page_of_whole_list(body(["b", "a"]), 2, "zzz", whole=True)
    assert (json.loads(cut)["tags"], following) == ([], None)
    cut, following = page_of_whole_list(body(["c", "a", "b"]), 1, "a", whole=True)
    assert (json.loads(cut)["tags"], following) == (["b"], "b")


def test_a_whole_list_goes_on_in_lexical_order() -> None:
    """The spec has every tag list in lexical order; Distribution 2.x answers the whole list in
    its storage's order, which the cache had passed on, while the pages it cut were sorted."""
    whole = tags_page(body(["b", "latest", "Z", "10", "2", "a"]), "", "")
    assert json.loads(whole.body)["tags"] == ["10", "2", "Z", "a", "b", "latest"]
    assert whole.next_query is None


def test_sorting_a_whole_list_keeps_the_rest_of_it() -> None:
    """gcr.io lists a map of every digest beside the tags, which some tools read."""
    listed = {"name": "owner/app", "tags": ["v2", "v1"], "manifest": {"sha256:" + "a" * 64: {"tag": ["v1"]}}}
    whole = tags_page(json.dumps(listed).encode(), "", "")
    assert json.loads(whole.body) == {**listed, "tags": ["v1", "v2"]}


def test_a_list_in_order_or_a_page_the_upstream_made_is_passed_on_byte_for_byte() -> None:
    in_order = b'{"name":"owner/app",  "tags":["a","b"]}'
    assert tags_page(in_order, "", "").body == in_order
    upstream_page = body(["yank", "alpha"])  # its last page, by a token of its own
    assert tags_page(upstream_page, "", "next_page=tok").body == upstream_page
