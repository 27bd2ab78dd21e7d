"""The spec grammar: what parses, and what is refused with which error kind."""

from __future__ import annotations

import pytest

from moorage.upstreams.reference import (
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    OCI_IMAGE_INDEX,
    OCI_IMAGE_MANIFEST,
    Digest,
    InvalidReference,
    Tag,
    _accept_class,
    accept_class,
    parse_digest,
    parse_reference,
    parse_repository,
    parse_tag,
    sniff_media_type,
)

HEX = "a" * 64


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c", "my-org/my_app", "a__b", "a--b", "a.b/c", "x" * 255, "0/1"],
)
def test_valid_names(name: str) -> None:
    assert parse_repository(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("..", id="dotdot"),
        pytest.param("a/../b", id="dotdot_component"),
        pytest.param("a//b", id="empty_component"),
        pytest.param("/a", id="leading_slash"),
        pytest.param("a/", id="trailing_slash"),
        pytest.param("Alpine", id="uppercase"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a%2Fb", id="encoded_slash"),
        pytest.param("x" * 256, id="256_chars"),
        pytest.param("a___b", id="triple_underscore"),
        pytest.param("-a", id="leading_dash"),
        pytest.param("a:b", id="colon"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_repository(name)
    assert caught.value.kind == "name"


@pytest.mark.parametrize("tag", ["latest", "3.19", "v1.0-rc_1", "_x", "A" * 128])
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == Tag(tag)


@pytest.mark.parametrize("tag", [".x", "-x", "a/b", "A" * 129, "", "a b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_tag(tag)
    assert caught.value.kind == "tag"


def test_digests() -> None:
    assert parse_digest(f"sha256:{HEX}") == Digest("sha256", HEX)
    assert str(parse_digest(f"sha512:{'b' * 128}")) == f"sha512:{'b' * 128}"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"sha256:{HEX[:-1]}", id="short"),
        pytest.param(f"sha256:{HEX}0", id="long"),
        pytest.param(f"sha256:{HEX.upper()}", id="uppercase"),
        pytest.param(f"md5:{HEX[:32]}", id="unknown_algorithm"),
        pytest.param(f"sha512:{HEX}", id="sha512_wrong_length"),
        pytest.param(HEX, id="no_algorithm"),
        pytest.param(f"sha256:../{HEX[:61]}", id="path"),
    ],
)
def test_invalid_digests(value: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_digest(value)
    assert caught.value.kind == "digest"


def test_reference_is_a_digest_when_it_has_a_colon() -> None:
    assert isinstance(parse_reference(f"sha256:{HEX}"), Digest)
    assert isinstance(parse_reference("3.19"), Tag)


def test_digest_of_and_matches() -> None:
    digest = Digest.of(b"hello")
    assert str(digest) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert digest.matches(b"hello") and not digest.matches(b"hello!")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        pytest.param([], "index", id="none"),
        pytest.param(["*/*"], "index", id="anything"),
        pytest.param([f"{DOCKER_MANIFEST_V2}, {DOCKER_MANIFEST_LIST}"], "index", id="docker_both"),
        pytest.param([OCI_IMAGE_MANIFEST, OCI_IMAGE_INDEX], "index", id="two_headers"),
        pytest.param([f"{DOCKER_MANIFEST_V2};q=0.9, {OCI_IMAGE_MANIFEST}"], "image", id="images_only"),
        pytest.param([DOCKER_MANIFEST_V2], "image", id="docker_v2_only"),
    ],
)
def test_accept_class(accept: list[str], expected: str) -> None:
    assert accept_class(accept) == expected
    assert accept_class(accept) == expected, "the same when remembered"


def test_a_huge_accept_header_is_classified_but_not_kept() -> None:
    """Answers are remembered per header: a client sending 100 KiB headers must not make the
    cache hold them."""
    huge = [f"{DOCKER_MANIFEST_V2}, " + ", ".join(f"application/x-{i}" for i in range(5000))]
    before = _accept_class.cache_info().currsize
    assert accept_class(huge) == "image"
    assert accept_class([*huge, OCI_IMAGE_INDEX]) == "index"
    assert _accept_class.cache_info().currsize == before


def test_sniff_media_type() -> None:
    assert sniff_media_type(b'{"mediaType": "%s"}' % DOCKER_MANIFEST_LIST.encode()) == DOCKER_MANIFEST_LIST
    assert sniff_media_type(b'{"schemaVersion": 2, "manifests": []}') == OCI_IMAGE_INDEX
    assert sniff_media_type(b'{"schemaVersion": 2, "layers": []}') == OCI_IMAGE_MANIFEST
