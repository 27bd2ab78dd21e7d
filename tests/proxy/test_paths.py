"""Reading ``/v2/`` paths (``proxy/_paths.py``): what each asks for, and which answers are
remembered: the same path with another query shares one, and a huge path takes no room."""

from __future__ import annotations

import pytest

from moorage.proxy._paths import V2Path, _parse, parse_v2_path
from moorage.upstreams.reference import InvalidReference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v2/team/app/manifests/1", V2Path("manifest", "team/app", "1")),
        ("/v2/team/app/manifests/1?ns=quay.io", V2Path("manifest", "team/app", "1")),
        (f"/v2/app/blobs/{DIGEST}", V2Path("blob", "app", DIGEST)),
        ("/v2/team/app/tags/list", V2Path("tags", "team/app", "")),
        (f"/v2/app/referrers/{DIGEST}", V2Path("referrers", "app", DIGEST)),
        ("/v2/app/blobs/uploads/", V2Path("upload", "app", "")),
        ("/v2/a/manifests/b/manifests/2", V2Path("manifest", "a/manifests/b", "2")),
        ("/v2/app/other/thing", None),
    ],
)
def test_what_a_path_asks_for(raw: str, expected: V2Path | None) -> None:
    assert parse_v2_path(raw) == expected


def test_encoded_characters_are_refused_each_time() -> None:
    for _ in range(2):
        with pytest.raises(InvalidReference):
            parse_v2_path("/v2/team%2Fapp/manifests/1")


@pytest.mark.parametrize(
    ("raw", "kind", "value"),
    [
        ("/v2/team%2Fapp/manifests/1", "name", "team%2Fapp/manifests/1"),
        ("/v2/team/app/manifests/bad%20tag", "reference", "bad%20tag"),
        ("/v2/team/app/blobs/sha256%3Aab", "digest", "sha256%3Aab"),
        ("/v2/team/app/referrers/sha256%3Aab", "digest", "sha256%3Aab"),
        ("/v2/team/app/tags/list%20", "name", "team/app/tags/list%20"),
    ],
)
def test_an_encoded_character_is_blamed_on_the_part_that_holds_it(raw: str, kind: str, value: str) -> None:
    """A tag with an encoded space was answered NAME_INVALID for the whole path: the client
    was told its repository name was wrong."""
    with pytest.raises(InvalidReference) as refused:
        parse_v2_path(raw)
    assert (refused.value.kind, refused.value.value) == (kind, value)


def test_a_query_or_a_huge_path_takes_no_room_among_the_remembered() -> None:
    parse_v2_path("/v2/team/queried/manifests/1")
    before = _parse.cache_info().currsize
    for namespace in ("docker.io", "quay.io", "ghcr.io"):
        assert parse_v2_path(f"/v2/team/queried/manifests/1?ns={namespace}") == V2Path("manifest", "team/queried", "1")
    huge = "/v2/" + "segment/" * 1000 + "manifests/1"
    assert parse_v2_path(huge) == V2Path("manifest", "segment/" * 999 + "segment", "1")
    assert _parse.cache_info().currsize == before, "one entry per path; none for a huge one"
