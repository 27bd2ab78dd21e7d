"""Property tests: whatever a client sends, a parsed name, digest or path cannot reach outside
the store's root or an upstream it does not name."""

from __future__ import annotations

import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorage.cache import DirectoryStore
from moorage.config import DEFAULT_UPSTREAMS, UpstreamSettings
from moorage.proxy._paths import parse_v2_path
from moorage.upstreams import NoRoute, Router
from moorage.upstreams.reference import InvalidReference, parse_digest, parse_reference, parse_repository

#: Text biased towards what attacks paths: separators, dots, percent signs, NUL, case.
TRICKY = st.text(alphabet=string.ascii_letters + string.digits + "./_-:%@\x00\\ ~", max_size=300)


class Upstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings


@given(TRICKY)
def test_a_parsed_name_is_a_relative_path_of_plain_components(value: str) -> None:
    try:
        name = parse_repository(value)
    except InvalidReference:
        return
    assert len(name) <= 255
    parts = name.split("/")
    assert all(part and part not in (".", "..") and not part.startswith(("-", ".")) for part in parts)
    assert name == name.lower() and "\x00" not in name and "%" not in name and "\\" not in name


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TRICKY | st.from_regex(r"sha(256|512):[0-9a-f]{64,128}", fullmatch=True))
def test_a_parsed_digest_stays_inside_the_store(tmp_path: Path, value: str) -> None:
    try:
        digest = parse_digest(value)
    except InvalidReference:
        return
    store = DirectoryStore(tmp_path)
    path = store.path_of(digest).resolve()
    assert path.is_relative_to(store.blobs_dir.resolve())


@given(TRICKY)
def test_a_reference_is_a_tag_or_a_digest_and_never_a_path(value: str) -> None:
    try:
        reference = parse_reference(value)
    except InvalidReference:
        return
    assert "/" not in str(reference) and "\x00" not in str(reference) and ".." not in str(reference)[:2]


ROUTER = Router(Upstream(s) for s in DEFAULT_UPSTREAMS)
HOSTS = [s.host for s in DEFAULT_UPSTREAMS]
NAMES = {name: s.host for s in DEFAULT_UPSTREAMS for name in (s.host, *s.aliases)}


@given(TRICKY, st.one_of(st.none(), st.sampled_from([*NAMES, "evil.example", "DOCKER.IO", ""])))
def test_routing_goes_only_where_the_request_says(name: str, ns: str | None) -> None:
    try:
        route = ROUTER.resolve(name, ns)
    except (InvalidReference, NoRoute):
        return
    host = route.upstream.settings.host
    if ns is not None:
        assert NAMES[ns.strip().lower()] == host, "ns picks exactly the upstream it names"
    else:
        first = name.split("/", 1)[0]
        prefixed = {p: s.host for s in DEFAULT_UPSTREAMS for p in (s.host, *s.aliases, *s.prefixes)}
        assert host == prefixed.get(first, "docker.io") if "/" in name else host == "docker.io"
    assert parse_repository(str(route.repository)) == route.repository


@given(st.text(alphabet=string.printable + "\x00", max_size=400))
def test_no_raw_path_reaches_a_route_with_encoded_or_odd_characters(raw: str) -> None:
    try:
        target = parse_v2_path("/v2/" + raw)
    except InvalidReference:
        return
    if target is not None:
        assert "%" not in target.name and "\x00" not in target.name and "?" not in target.name
